//! The `wsproxy` command: the command line, logging set-up, signals and exit codes. The proxy
//! itself is the library's [`wsproxy::run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;
/// Exit code for any other failure to start or run.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(name = "wsproxy", version, about = "Reverse WebSocket proxy with a kernel (eBPF sockmap) relay")]
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
    /// Run the proxy (stops on SIGTERM or SIGINT).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = "/etc/wsproxy/wsproxy.toml")]
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
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Run { config } => runtime().and_then(|rt| rt.block_on(run(&config))).unwrap_or_else(fail),
        Command::EchoServer { listen } => runtime().and_then(|rt| rt.block_on(echo_server(listen))).unwrap_or_else(fail),
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

async fn run(path: &Path) -> Result<ExitCode, Failure> {
    let config = wsproxy::Config::load(path).map_err(|e| Failure(EXIT_CONFIG, e.to_string()))?;
    let listener = wsproxy::listener::bind(config.listen)
        .map_err(|e| Failure(EXIT_FAILURE, format!("cannot listen on {}: {e}", config.listen)))?;
    let shutdown = shutdown_signal().map_err(|e| Failure(EXIT_FAILURE, format!("cannot handle signals: {e}")))?;
    wsproxy::run(config, listener, shutdown).await.map_err(|e| Failure(EXIT_FAILURE, format!("{e:#}")))?;
    Ok(ExitCode::SUCCESS)
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
