//! `[upgrade]`: where a running proxy listens for its successor (a new binary taking over its
//! listeners and connections), and how long it gives it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Binary upgrades, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The Unix socket (mode 0600) the new process connects to.
    pub socket: PathBuf,
    /// The new process must have taken over within this time (from its start), or the upgrade
    /// is called off and the running process keeps everything.
    pub timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct UpgradeFile {
    socket: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
}

impl Default for UpgradeFile {
    fn default() -> Self {
        Self {
            socket: None,
            timeout: Duration::from_secs(30),
        }
    }
}

impl UpgradeFile {
    /// `None`: upgrades are off (no socket), or a problem went to `p`.
    pub(super) fn validate(&self, p: &mut Vec<String>) -> Option<Upgrade> {
        let problems = p.len();
        if self.timeout < Duration::from_secs(1) || self.timeout > Duration::from_secs(600) {
            p.push(format!("upgrade.timeout: must be 1s to 10m, got {:?}", self.timeout));
        }
        let socket = self.socket.as_ref()?;
        if !socket.is_absolute() {
            p.push(format!("upgrade.socket: {} must be an absolute path", socket.display()));
        } else if socket.as_os_str().len() > super::admin::MAX_UNIX_PATH {
            p.push(format!(
                "upgrade.socket: {} is longer than {} bytes",
                socket.display(),
                super::admin::MAX_UNIX_PATH
            ));
        }
        (p.len() == problems).then(|| Upgrade {
            socket: socket.clone(),
            timeout: self.timeout,
        })
    }
}
