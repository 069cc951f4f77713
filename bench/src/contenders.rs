//! The contenders and the processes behind them: the upstream, wsproxy in both relay modes, nginx,
//! HAProxy (with and without splice) and Caddy, each started from a generated configuration in a
//! temporary directory, in its topology's network namespace (`ip netns exec`), pinned with
//! `taskset`, and killed when the benchmark ends (on drop, on panic, and through
//! `PR_SET_PDEATHSIG` if the benchmark itself is killed).
//!
//! For the TLS workloads each proxy runs again, separately, with a TLS listener: the same
//! certificate and key for all (`tls::generate`), TLS 1.3 and TLS_AES_128_GCM_SHA256 where the
//! proxy's configuration can pin them, the rest of the configuration as for plain ws. Direct has
//! no TLS form (the upstream is plain ws).

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::load;
use crate::tls;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    WsproxyKernel,
    WsproxyUserspace,
    /// `relay.mode = "auto"`: userspace first, the kernel relay for message traffic.
    WsproxyAuto,
    Nginx,
    Haproxy,
    HaproxySplice,
    Caddy,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Direct,
        Kind::WsproxyKernel,
        Kind::WsproxyUserspace,
        Kind::WsproxyAuto,
        Kind::Nginx,
        Kind::Haproxy,
        Kind::HaproxySplice,
        Kind::Caddy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::WsproxyKernel => "wsproxy-kernel",
            Kind::WsproxyUserspace => "wsproxy-userspace",
            Kind::WsproxyAuto => "wsproxy-auto",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::HaproxySplice => "haproxy-splice",
            Kind::Caddy => "caddy",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The `relay.mode` of a wsproxy contender; `None` for the others.
    pub fn wsproxy_mode(self) -> Option<&'static str> {
        match self {
            Kind::WsproxyKernel => Some("kernel"),
            Kind::WsproxyUserspace => Some("userspace"),
            Kind::WsproxyAuto => Some("auto"),
            _ => None,
        }
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `program args` in network namespace `netns` (None: this thread's), pinned to `cpu`,
    /// output to `log`; it dies with the benchmark. `ip netns exec` and `taskset` exec the
    /// program, so the pid is the program's.
    pub fn spawn(
        name: &str,
        cpu: usize,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
        netns: Option<&str>,
    ) -> Result<Proc> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "taskset"]);
                c
            }
            None => Command::new("taskset"),
        };
        cmd.arg("-c").arg(cpu.to_string()).arg(program).args(args);
        cmd.envs(envs.iter().copied());
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        crate::sys::register_ours(child.id());
        Ok(Proc {
            name: name.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already ended.
    pub fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: the pid names our own child, which has not been reaped.
            unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One contender: where the generator connects, and the proxy process if there is one.
pub struct Contender {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub proc: Option<Proc>,
    /// The proxy's RSS right after start, before any connection (bytes).
    pub rss_at_start: u64,
    /// A TLS listener: what a connection of the generator negotiated, and what one offering
    /// everything did.
    pub negotiated: Option<tls::Negotiated>,
}

impl Contender {
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

pub struct Setup<'a> {
    pub dir: &'a Path,
    pub wsproxy: &'a Path,
    pub upstream: SocketAddr,
    pub proxy_cpu: usize,
    /// RLIMIT_NOFILE the proxies inherit; nginx and HAProxy are told to stay within it.
    pub nofile: u64,
    /// The network namespace the proxies run in (None: the host's).
    pub netns: Option<String>,
    /// TLS listeners with this certificate, and the clients that check them.
    pub tls: Option<&'a tls::Kit>,
}

pub fn start(kind: Kind, addr: SocketAddr, s: &Setup) -> Result<Contender> {
    let name = kind.name();
    let log = s.dir.join(format!("{name}.log"));
    let files = s.tls.map(|k| &k.files);
    let proc = match kind {
        Kind::Direct if s.tls.is_some() => bail!("direct has no TLS listener (the upstream is plain ws)"),
        Kind::Direct => None,
        Kind::WsproxyKernel | Kind::WsproxyUserspace | Kind::WsproxyAuto => {
            let mode = kind.wsproxy_mode().expect("a wsproxy contender");
            let cfg = s.dir.join(format!("{name}.toml"));
            let mut text = wsproxy_config(addr, s.upstream, mode);
            if let Some(f) = files {
                text += &wsproxy_tls(f);
            }
            fs::write(&cfg, text)?;
            let args = vec!["run".into(), "--config".into(), cfg.display().to_string()];
            Some(Proc::spawn(
                name,
                s.proxy_cpu,
                s.wsproxy,
                &args,
                &[("RUST_LOG", "warn")],
                &log,
                s.netns.as_deref(),
            )?)
        }
        Kind::Nginx => {
            let prefix = s.dir.join("nginx");
            fs::create_dir_all(prefix.join("logs"))?;
            let cfg = prefix.join("nginx.conf");
            fs::write(&cfg, nginx_config(addr, s.upstream, &prefix, s.nofile, files))?;
            let args = vec![
                "-p".into(),
                prefix.display().to_string(),
                "-c".into(),
                cfg.display().to_string(),
                "-e".into(),
                prefix.join("logs/error.log").display().to_string(),
            ];
            Some(Proc::spawn(
                name,
                s.proxy_cpu,
                Path::new("nginx"),
                &args,
                &[],
                &log,
                s.netns.as_deref(),
            )?)
        }
        Kind::Haproxy | Kind::HaproxySplice => {
            let cfg = s.dir.join(format!("{name}.cfg"));
            fs::write(
                &cfg,
                haproxy_config(addr, s.upstream, kind == Kind::HaproxySplice, s.nofile, files),
            )?;
            let args = vec!["-f".into(), cfg.display().to_string(), "-db".into()];
            Some(Proc::spawn(
                name,
                s.proxy_cpu,
                Path::new("haproxy"),
                &args,
                &[],
                &log,
                s.netns.as_deref(),
            )?)
        }
        Kind::Caddy => {
            let home = s.dir.join("caddy");
            fs::create_dir_all(&home)?;
            let cfg = home.join("Caddyfile");
            fs::write(&cfg, caddy_config(addr, s.upstream, files))?;
            let args = vec![
                "run".into(),
                "--config".into(),
                cfg.display().to_string(),
                "--adapter".into(),
                "caddyfile".into(),
            ];
            let home = home.display().to_string();
            let envs = [
                ("HOME", home.as_str()),
                ("XDG_DATA_HOME", home.as_str()),
                ("XDG_CONFIG_HOME", home.as_str()),
                // One CPU, as the other proxies get (taskset pins it there anyway).
                ("GOMAXPROCS", "1"),
            ];
            Some(Proc::spawn(
                name,
                s.proxy_cpu,
                Path::new("caddy"),
                &args,
                &envs,
                &log,
                s.netns.as_deref(),
            )?)
        }
    };
    let mut c = Contender {
        kind,
        addr,
        proc,
        rss_at_start: 0,
        negotiated: None,
    };
    wait_listening(&mut c, &log)?;
    // Let it settle, then note its memory before any connection.
    thread::sleep(Duration::from_millis(300));
    if let Some(pid) = c.pid() {
        c.rss_at_start = crate::sys::rss(pid)?;
    }
    let failed = || format!("{name}: an echo through it failed (log: {})", log.display());
    match s.tls {
        None => load::check(addr).with_context(failed)?,
        Some(k) => {
            let measured = load::check_tls(addr, &k.client).with_context(failed)?;
            let preferred = load::tls_handshake(addr, &k.offering_all)
                .with_context(|| format!("{name}: a TLS handshake offering every suite failed"))?;
            c.negotiated = Some(tls::Negotiated { measured, preferred });
        }
    }
    Ok(c)
}

/// Waits (up to 20 s) until `c` accepts connections; fails at once if its process ended.
pub fn wait_listening(c: &mut Contender, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(p) = c.proc.as_mut()
            && let Err(e) = p.alive()
        {
            let tail = fs::read_to_string(log).unwrap_or_default();
            bail!("{e}: {}", tail.trim());
        }
        if TcpStream::connect_timeout(&c.addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} is not listening on {} after 20 s (log: {})",
                c.name(),
                c.addr,
                log.display()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// wsproxy's limits in every benchmark configuration: none that binds, as for the other
/// contenders.
pub const WSPROXY_LIMITS: &str = "[limits]
requests_per_second = 1000000000.0
burst = 1000000000
max_connections_per_ip = 0
max_tracked_clients = 100000
";

/// wsproxy with limits that never bind in a benchmark, no admin listener, the given relay mode.
pub fn wsproxy_config(listen: SocketAddr, upstream: SocketAddr, mode: &str) -> String {
    format!(
        r#"# Generated by wsproxy-bench.
[listen]
address = "{listen}"
max_connections = 100000
drain_timeout = "1s"

{WSPROXY_LIMITS}
[upstreams]
main = [{{ address = "{upstream}" }}]
timeout = "10s"

[relay]
mode = "{mode}"
"#
    )
}

/// wsproxy's `[tls]`: the certificate, TLS 1.3 only, with the one suite pinned as for nginx and
/// HAProxy.
pub fn wsproxy_tls(f: &tls::Files) -> String {
    format!(
        r#"
[tls]
certificate = "{}"
key = "{}"
min_version = "1.3"
cipher_suites = ["{}"]
"#,
        f.certificate.display(),
        f.key.display(),
        tls::SUITE
    )
}

/// nginx as operators run it for WebSocket: one worker, HTTP/1.1 upstream with the Upgrade and
/// Connection headers, a long read timeout, TCP_NODELAY, no access log. With `tls`: an `ssl`
/// listener, TLS 1.3 with TLS_AES_128_GCM_SHA256 only, nginx's defaults otherwise (session
/// tickets on, no shared session cache).
pub fn nginx_config(
    listen: SocketAddr,
    upstream: SocketAddr,
    prefix: &Path,
    nofile: u64,
    tls: Option<&tls::Files>,
) -> String {
    let p = prefix.display();
    let conns = nofile.saturating_sub(50);
    let (ssl, ssl_conf) = match tls {
        None => ("", String::new()),
        Some(f) => (
            " ssl",
            format!(
                "        ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.3;\n        ssl_conf_command Ciphersuites {};\n",
                f.certificate.display(),
                f.key.display(),
                tls::SUITE
            ),
        ),
    };
    format!(
        r#"# Generated by wsproxy-bench.
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;

events {{
    worker_connections {conns};
}}

http {{
    access_log off;
    tcp_nodelay on;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;

    upstream bench_upstream {{
        server {upstream};
    }}

    server {{
        listen {listen}{ssl} backlog=4096;
{ssl_conf}        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"#
    )
}

/// HAProxy in http mode: one thread, `timeout tunnel` for the upgraded connections, optionally
/// splice(2) both ways. HAProxy sets TCP_NODELAY on its sockets itself. With `tls`: an `ssl`
/// bind with the certificate and key in one file, ALPN http/1.1, TLS 1.3 with
/// TLS_AES_128_GCM_SHA256 only (splice cannot carry a TLS side: HAProxy copies those bytes).
pub fn haproxy_config(
    listen: SocketAddr,
    upstream: SocketAddr,
    splice: bool,
    nofile: u64,
    tls: Option<&tls::Files>,
) -> String {
    // HAProxy needs two descriptors per proxied connection, two per pipe, and a few of its own;
    // it refuses to start when the sum exceeds a limit it cannot raise. Idle connections hold no
    // pipe (a pipe is taken only while spliced data waits in it), so few pipes are enough.
    let maxconn = nofile.saturating_sub(280) / 2;
    let maxpipes = (nofile.saturating_sub(2 * maxconn + 120) / 2).max(16);
    let (splice, pipes) = if splice {
        (
            "    option splice-request\n    option splice-response\n",
            format!("    maxpipes {maxpipes}\n"),
        )
    } else {
        ("", String::new())
    };
    let ssl = tls.map_or_else(String::new, |f| {
        format!(
            " ssl crt {} alpn http/1.1 ssl-min-ver TLSv1.3 ciphersuites {}",
            f.combined.display(),
            tls::SUITE
        )
    });
    format!(
        r#"# Generated by wsproxy-bench.
global
    nbthread 1
    maxconn {maxconn}
{pipes}
defaults
    mode http
    maxconn {maxconn}
    timeout connect 10s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
{splice}
frontend bench
    bind {listen}{ssl}
    default_backend upstream

backend upstream
    server up {upstream}
"#
    )
}

/// Caddy as its documentation has it for WebSocket: `reverse_proxy` upgrades by itself. No admin
/// endpoint, no automatic HTTPS, no access log (Caddy logs none unless told), HTTP/1.1 only.
/// With `tls`: an https site with the certificate and key, TLS 1.3 only (Go's TLS has no
/// setting for TLS 1.3 suites: the generator offers TLS_AES_128_GCM_SHA256 alone).
pub fn caddy_config(listen: SocketAddr, upstream: SocketAddr, tls: Option<&tls::Files>) -> String {
    let (scheme, site_tls) = match tls {
        None => ("http", String::new()),
        Some(f) => (
            "https",
            format!(
                "\ttls {} {} {{\n\t\tprotocols tls1.3\n\t}}\n",
                f.certificate.display(),
                f.key.display()
            ),
        ),
    };
    format!(
        r#"# Generated by wsproxy-bench.
{{
	admin off
	auto_https off
	servers {{
		protocols h1
	}}
}}

{scheme}://:{port} {{
	bind {ip}
{site_tls}	reverse_proxy {upstream}
}}
"#,
        port = listen.port(),
        ip = listen.ip(),
    )
}

/// The first line a contender's program prints about its version.
pub fn version(kind: Kind) -> String {
    match kind {
        Kind::Nginx => crate::sys::command_line("nginx", &["-v"]),
        Kind::Haproxy | Kind::HaproxySplice => crate::sys::command_line("haproxy", &["-v"]),
        Kind::Caddy => crate::sys::command_line("caddy", &["version"]),
        _ => String::new(),
    }
}

/// Installs what the chosen contenders need (Debian's nginx-light, haproxy, caddy), a TrueType
/// font for the plots, and perf when profiling, if missing.
pub fn ensure_packages(kinds: &[Kind], perf: bool) -> Result<()> {
    let have = |p: &str| Command::new("which").arg(p).output().is_ok_and(|o| o.status.success());
    let mut missing = Vec::new();
    let wants = [
        (kinds.contains(&Kind::Nginx), "nginx", "nginx-light"),
        (
            kinds.iter().any(|k| matches!(k, Kind::Haproxy | Kind::HaproxySplice)),
            "haproxy",
            "haproxy",
        ),
        (kinds.contains(&Kind::Caddy), "caddy", "caddy"),
        (perf, "perf", "linux-perf"),
    ];
    for (wanted, program, package) in wants {
        if wanted && !have(program) {
            missing.push(package);
        }
    }
    if !crate::plot::FONT_PATHS.iter().any(|p| Path::new(p).exists()) {
        missing.push("fonts-dejavu-core");
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("bench: installing {}", missing.join(" "));
    let install = |update: bool| -> Result<bool> {
        if update {
            Command::new("apt-get").arg("update").status()?;
        }
        let status = Command::new("apt-get")
            // Wait for another install's dpkg lock instead of failing.
            .args([
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "-y",
                "--no-install-recommends",
            ])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        Ok(status.success())
    };
    if !install(false)? && !install(true)? {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// Where generated configurations and logs go: a fresh directory under the system's temp dir.
pub fn temp_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("wsproxy-bench-{}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_configs_name_the_upstream() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
        let l: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let u: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert!(wsproxy_config(l, u, "kernel").contains("mode = \"kernel\""));
        assert!(haproxy_config(l, u, true, 20000, None).contains("option splice-response"));
        assert!(!haproxy_config(l, u, false, 20000, None).contains("splice"));
        assert!(!haproxy_config(l, u, false, 20000, None).contains("ssl"));
        let nginx = nginx_config(l, u, Path::new("/t"), 20000, None);
        assert!(nginx.contains("server 127.0.0.1:2;") && nginx.contains("listen 127.0.0.1:1 backlog=4096;"));
        assert!(!nginx.contains("ssl"));
        let caddy = caddy_config(l, u, None);
        assert!(
            caddy.contains("http://:1 {")
                && caddy.contains("bind 127.0.0.1")
                && caddy.contains("reverse_proxy 127.0.0.1:2")
                && !caddy.contains("tls")
        );
    }

    #[test]
    fn tls_configs_name_the_certificate_and_pin_the_suite() {
        let l: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let u: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let f = tls::Files {
            certificate: "/d/cert.pem".into(),
            key: "/d/key.pem".into(),
            combined: "/d/combined.pem".into(),
            der: Vec::new().into(),
        };
        let ws = wsproxy_config(l, u, "auto") + &wsproxy_tls(&f);
        assert!(ws.contains(
            "[tls]\ncertificate = \"/d/cert.pem\"\nkey = \"/d/key.pem\"\nmin_version = \"1.3\"\ncipher_suites = [\"TLS_AES_128_GCM_SHA256\"]"
        ));
        let nginx = nginx_config(l, u, Path::new("/t"), 20000, Some(&f));
        for line in [
            "listen 127.0.0.1:1 ssl backlog=4096;",
            "ssl_certificate /d/cert.pem;",
            "ssl_certificate_key /d/key.pem;",
            "ssl_protocols TLSv1.3;",
            "ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;",
        ] {
            assert!(nginx.contains(line), "{line}\n{nginx}");
        }
        assert!(haproxy_config(l, u, true, 20000, Some(&f)).contains(
            "bind 127.0.0.1:1 ssl crt /d/combined.pem alpn http/1.1 ssl-min-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256\n"
        ));
        let caddy = caddy_config(l, u, Some(&f));
        assert!(
            caddy.contains("https://:1 {")
                && caddy.contains("tls /d/cert.pem /d/key.pem {\n\t\tprotocols tls1.3\n\t}")
                && caddy.contains("reverse_proxy 127.0.0.1:2"),
            "{caddy}"
        );
    }
}
