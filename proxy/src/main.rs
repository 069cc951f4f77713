//! The `wsproxy` command: the command line, logging set-up, signals and exit codes. The proxy
//! itself is the library's [`wsproxy::run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

const DEFAULT_CONFIG: &str = "/etc/wsproxy/wsproxy.toml";

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;
/// Exit code for any other failure to start or run.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "wsproxy",
    version,
    about = "Reverse WebSocket proxy with a kernel (eBPF sockmap) relay"
)]
struct Cli {
    /// Log format: human-readable lines or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: SIGHUP reloads the configuration, SIGTERM or SIGINT stops it gracefully.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Ask a running proxy to reload its configuration, through its admin listener (the
    /// `admin.address` of FILE); prints the result, or every problem of the new file.
    Reload {
        /// Configuration file of the running proxy.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Upgrade a running proxy to the executable at its path (a new build installed there)
    /// without dropping a connection: through its `upgrade.socket`; prints the outcome (same as
    /// SIGUSR2, which prints nothing).
    Upgrade {
        /// Configuration file of the running proxy.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration file: prints every problem, exits 0 when valid and 2 when not.
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Run a WebSocket echo server, to try the proxy or to test an installation.
    EchoServer {
        /// Address to listen on, such as 127.0.0.1:9001.
        #[arg(long)]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    // Before anything could replace the executable: an upgrade runs what is at this path then.
    wsproxy::upgrade::record_invocation();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Reload { config } => reload(&config).unwrap_or_else(fail),
        Command::Upgrade { config } => upgrade(&config).unwrap_or_else(fail),
        Command::Run { config } => run(&config).unwrap_or_else(fail),
        Command::EchoServer { listen } => runtime()
            .and_then(|rt| rt.block_on(echo_server(listen)))
            .unwrap_or_else(fail),
    }
}

fn check_config(file: &Path) -> ExitCode {
    match wsproxy::Config::load(file) {
        Ok(_) => {
            println!("{}: valid", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsproxy: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `wsproxy run`. The privileged part (loading the kernel relay, binding) runs first, on the
/// only thread; then every capability is dropped, and only then the runtime starts its threads.
fn run(path: &Path) -> Result<ExitCode, Failure> {
    if let Some(socket) = std::env::var_os(wsproxy::upgrade::TAKE_OVER_FROM) {
        // Started by a running proxy to take over from it: its listeners, kernel relay and
        // connections come over its hand-over socket (and this process holds no privileges).
        return runtime()?.block_on(take_over(path, PathBuf::from(socket)));
    }
    let server = wsproxy::Server::from_file(path.to_path_buf()).map_err(|e| match e {
        wsproxy::StartError::Config(e) => Failure(EXIT_CONFIG, e.to_string()),
        e => Failure(EXIT_FAILURE, e.to_string()),
    })?;
    let config = server.config();
    let bind = |addr| {
        wsproxy::listener::bind_std(addr).map_err(|e| Failure(EXIT_FAILURE, format!("cannot listen on {addr}: {e}")))
    };
    let listeners = config
        .listeners()
        .into_iter()
        .map(|a| bind(a).map(|l| (a, l)))
        .collect::<Result<Vec<_>, _>>()?;
    let admin = config
        .admin
        .as_ref()
        .map(|a| {
            wsproxy::admin::bind_std(&a.address)
                .map_err(|e| Failure(EXIT_FAILURE, format!("cannot listen on {}: {e}", a.address)))
        })
        .transpose()?;
    match wsproxy::privileges::drop_all() {
        Ok(d) if d.before.is_empty() => tracing::info!("privileges: none held"),
        Ok(d) => tracing::info!(dropped = %d.before.join(","), "privileges: dropped every capability after start-up"),
        Err(e) => tracing::warn!("privileges: could not drop capabilities: {e}"),
    }
    runtime()?.block_on(serve(server, listeners, admin, None))
}

/// `wsproxy run` started by a running proxy's upgrade: takes over from it, then serves.
async fn take_over(path: &Path, socket: PathBuf) -> Result<ExitCode, Failure> {
    let mut t = wsproxy::upgrade::take_over(&socket)
        .await
        .map_err(|e| Failure(EXIT_FAILURE, format!("taking over: {e}")))?;
    let server = wsproxy::Server::from_file_taking_over(path.to_path_buf(), t.kernel.take()).map_err(|e| match e {
        wsproxy::StartError::Config(e) => Failure(EXIT_CONFIG, e.to_string()),
        e => Failure(EXIT_FAILURE, e.to_string()),
    })?;
    let listeners = std::mem::take(&mut t.listeners);
    let admin = match (t.admin.take(), server.config().admin) {
        (Some(fd), Some(a)) => Some(
            wsproxy::admin::adopt_std(fd, &a.address)
                .map_err(|e| Failure(EXIT_FAILURE, format!("cannot use the admin listener: {e}")))?,
        ),
        _ => None,
    };
    tracing::info!(listeners = listeners.len(), "takeover: listening sockets received");
    serve(server, listeners, admin, Some(t)).await
}

async fn serve(
    server: wsproxy::Server,
    listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    admin: Option<wsproxy::admin::StdListener>,
    takeover: Option<wsproxy::upgrade::Takeover>,
) -> Result<ExitCode, Failure> {
    let signals = Signals::install().map_err(|e| Failure(EXIT_FAILURE, format!("cannot handle signals: {e}")))?;
    let tokio_listener = |l| {
        tokio::net::TcpListener::from_std(l).map_err(|e| Failure(EXIT_FAILURE, format!("cannot use the listener: {e}")))
    };
    let listeners = listeners
        .into_iter()
        .map(|(a, l)| tokio_listener(l).map(|l| (a, l)))
        .collect::<Result<_, _>>()?;
    let admin = admin
        .map(|a| {
            if let Ok(fd) = a.try_clone_fd() {
                server.keep_admin_socket(fd);
            }
            wsproxy::admin::Listener::from_std(a)
        })
        .transpose()
        .map_err(|e| Failure(EXIT_FAILURE, format!("cannot use the admin listener: {e}")))?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(signals.handle(server.clone(), stop.clone()));
    // The admin listener outlives the drain, so that /healthz reports it (503) and /metrics
    // can be watched until the end; after an upgrade it is the successor's at once.
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(server.serve_all(listeners, stop.clone().cancelled_owned()));
    let admin_task = admin.map(|admin| {
        let (server, admin_stop) = (server.clone(), admin_stop.clone());
        tokio::spawn(async move { server.serve_admin(admin, admin_stop.cancelled_owned()).await })
    });
    let upgraded = server.upgraded_signal();
    tokio::spawn({
        let admin_stop = admin_stop.clone();
        async move {
            upgraded.cancelled().await;
            wsproxy::admin::keep_socket_file();
            admin_stop.cancel();
        }
    });
    server.serving().await;
    let upgrades = match takeover {
        None => {
            notify(&[sd_notify::NotifyState::Ready]);
            tokio::spawn(wsproxy::upgrade::serve(server.clone(), stop.clone()))
        }
        Some(t) => {
            // This process is the service's main process from now on (NotifyAccess=all).
            notify(&[
                sd_notify::NotifyState::MainPid(std::process::id()),
                sd_notify::NotifyState::Ready,
            ]);
            let (server, stop) = (server.clone(), stop.clone());
            tokio::spawn(async move {
                t.run(server.clone()).await;
                wsproxy::upgrade::serve(server, stop).await;
            })
        }
    };
    let _ = serving.await;
    if server.upgraded() {
        // The hand-over of the last connections, then Done.
        let _ = upgrades.await;
    }
    admin_stop.cancel();
    // It closes its connections and removes its socket file (a Unix socket) before it ends.
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `wsproxy upgrade`: asks the running proxy (the `upgrade.socket` of FILE) to upgrade.
fn upgrade(path: &Path) -> Result<ExitCode, Failure> {
    let config = wsproxy::Config::load(path).map_err(|e| Failure(EXIT_CONFIG, e.to_string()))?;
    let u = config.upgrade.ok_or_else(|| {
        Failure(
            EXIT_FAILURE,
            format!("{}: upgrade.socket is not set; upgrades are off", path.display()),
        )
    })?;
    let limit = u.timeout + wsproxy::upgrade::REQUEST_MARGIN;
    match runtime()?.block_on(wsproxy::upgrade::request(&u.socket, limit)) {
        Ok(message) => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(Failure(EXIT_FAILURE, format!("upgrade failed: {e}"))),
    }
}

/// The proxy's signal handlers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// SIGHUP reloads; the first SIGTERM or SIGINT stops (graceful: see `listen.drain_timeout`).
    async fn handle(self, server: wsproxy::Server, stop: tokio_util::sync::CancellationToken) {
        let Signals {
            mut term,
            mut int,
            mut hup,
            mut usr2,
        } = self;
        loop {
            tokio::select! {
                _ = usr2.recv() => {
                    tracing::info!("SIGUSR2: upgrading");
                    server.request_upgrade();
                    continue;
                }
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                _ = hup.recv() => {
                    // systemd wants MONOTONIC_USEC with RELOADING=1.
                    match sd_notify::NotifyState::monotonic_usec_now() {
                        Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
                        Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
                    }
                    match server.reload() {
                        Ok(notes) => {
                            tracing::info!("SIGHUP: configuration reloaded");
                            for n in notes {
                                tracing::warn!("reload: {n}");
                            }
                        }
                        Err(e) => tracing::error!("SIGHUP: reload refused, keeping the running configuration: {e}"),
                    }
                    notify(&[sd_notify::NotifyState::Ready]);
                    continue;
                }
            }
            notify(&[sd_notify::NotifyState::Stopping]);
            stop.cancel();
            return;
        }
    }
}

/// Tells systemd (Type=notify) about the service's state; nothing without NOTIFY_SOCKET.
fn notify(states: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(states);
}

/// `wsproxy reload`: POST /reload to the admin listener named in the configuration file, with
/// the token of `admin.token_file` when it is set.
fn reload(path: &Path) -> Result<ExitCode, Failure> {
    let config = wsproxy::Config::load(path).map_err(|e| Failure(EXIT_CONFIG, e.to_string()))?;
    let admin = config.admin.ok_or_else(|| {
        Failure(
            EXIT_FAILURE,
            format!(
                "{}: admin.address is not set; send SIGHUP to the proxy instead",
                path.display()
            ),
        )
    })?;
    let (status, body) = wsproxy::admin::request_reload(&admin).map_err(|e| {
        Failure(
            EXIT_FAILURE,
            format!("cannot reach the admin listener {}: {e}", admin.address),
        )
    })?;
    match status {
        200 => {
            print!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        // The new file is invalid: every problem is in the body.
        400 => {
            eprint!("wsproxy: {body}");
            Ok(ExitCode::from(EXIT_CONFIG))
        }
        _ => Err(Failure(
            EXIT_FAILURE,
            format!(
                "the admin listener {} answered {status}: {}",
                admin.address,
                body.trim_end()
            ),
        )),
    }
}

async fn echo_server(listen: SocketAddr) -> Result<ExitCode, Failure> {
    let listener = wsproxy::listener::bind(listen)
        .map_err(|e| Failure(EXIT_FAILURE, format!("cannot listen on {listen}: {e}")))?;
    let shutdown = shutdown_signal().map_err(|e| Failure(EXIT_FAILURE, format!("cannot handle signals: {e}")))?;
    tracing::info!(listen = %listen, "echo server accepting connections");
    wsproxy::echo::serve(listener, shutdown).await;
    Ok(ExitCode::SUCCESS)
}

/// A reason to exit: the code and one line for the operator.
struct Failure(u8, String);

fn fail(Failure(code, message): Failure) -> ExitCode {
    eprintln!("wsproxy: {message}");
    ExitCode::from(code)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(EXIT_FAILURE, format!("cannot start the runtime: {e}")))
}

/// Completes at the first SIGTERM or SIGINT. The handlers are installed before it is returned,
/// so a signal that arrives while the proxy starts is not lost.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
