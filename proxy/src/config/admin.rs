//! `[admin]`: the admin listener's address, limits and bearer token.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the admin listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddress {
    Tcp(SocketAddr),
    /// `unix:PATH`: a Unix stream socket (mode 0600), removed when the listener stops.
    Unix(PathBuf),
}

impl fmt::Display for AdminAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddress::Tcp(a) => write!(f, "{a}"),
            AdminAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub address: AdminAddress,
    /// A connection without a complete request for this long (from its accept, or from the
    /// previous answer on a kept-alive connection) is closed.
    pub idle_timeout: Duration,
    /// Admin connections open at once; past it a connection is answered 503 and closed.
    pub max_connections: usize,
    /// Where `token` was read from.
    pub token_file: Option<PathBuf>,
    /// When set, `POST /reload` needs `Authorization: Bearer <token>`.
    pub token: Option<Token>,
}

impl Admin {
    /// The defaults of every setting but the address.
    pub fn new(address: AdminAddress) -> Admin {
        let d = AdminFile::default();
        Admin {
            address,
            idle_timeout: d.idle_timeout,
            max_connections: d.max_connections,
            token_file: None,
            token: None,
        }
    }
}

/// A bearer token; its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Largest token file read: a token is a line, and a path such as /dev/zero must not be read
/// to its end.
const MAX_TOKEN_FILE: u64 = 4096;
/// Longest `sun_path` of a Unix socket address, its terminating NUL excluded.
pub(super) const MAX_UNIX_PATH: usize = 107;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct AdminFile {
    address: Option<String>,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    max_connections: usize,
    token_file: Option<PathBuf>,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            address: None,
            idle_timeout: Duration::from_secs(10),
            max_connections: 64,
            token_file: None,
        }
    }
}

impl AdminFile {
    /// The admin listener, or `None` when `address` is unset; every problem goes to `p`.
    pub(super) fn validate(&self, p: &mut Vec<String>) -> Option<Admin> {
        let address = match self.address.as_deref().map(parse_admin_address) {
            None => None,
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                p.push(format!("admin.address: {e}"));
                None
            }
        };
        let problems = p.len();
        if self.idle_timeout < Duration::from_millis(100) || self.idle_timeout > Duration::from_secs(3600) {
            p.push(format!(
                "admin.idle_timeout: must be 100ms to 1h, got {:?}",
                self.idle_timeout
            ));
        }
        if !(1..=4096).contains(&self.max_connections) {
            p.push(format!(
                "admin.max_connections: must be 1 to 4096, got {}",
                self.max_connections
            ));
        }
        let token = match &self.token_file {
            None => None,
            Some(path) => match read_token(path) {
                Ok(t) => Some(t),
                Err(e) => {
                    p.push(format!("admin.token_file: {e}"));
                    None
                }
            },
        };
        if p.len() > problems {
            return None;
        }
        Some(Admin {
            address: address?,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            token_file: self.token_file.clone(),
            token,
        })
    }
}

/// `"IP:PORT"` or `"unix:/absolute/path"`.
fn parse_admin_address(a: &str) -> Result<AdminAddress, String> {
    if let Some(path) = a.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "{a:?}: the socket path must be absolute, such as \"unix:/run/wsproxy/admin.sock\""
            ));
        }
        if path.as_os_str().len() > MAX_UNIX_PATH {
            return Err(format!("{a:?}: the socket path is longer than {MAX_UNIX_PATH} bytes"));
        }
        return Ok(AdminAddress::Unix(path));
    }
    a.parse::<SocketAddr>().map(AdminAddress::Tcp).map_err(|_| {
        format!("{a:?} is not an IP address and port such as \"127.0.0.1:9090\", nor \"unix:\" and a socket path")
    })
}

/// The token of a token file: its content without surrounding white space (a trailing newline).
fn read_token(path: &Path) -> Result<Token, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown}: must be an absolute path"));
    }
    // Non-blocking, so that a FIFO named by mistake is refused below rather than waited on.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!("{shown} is longer than {MAX_TOKEN_FILE} bytes"));
    }
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    // What a header value can carry as it is: visible ASCII, no white space.
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the token in {shown} must be visible ASCII characters without spaces"
        ));
    }
    Ok(Token(String::from_utf8_lossy(token).into_owned()))
}
