//! Profiles for the report's analysis: `perf record -a -g` (cpu-clock sampling: these VMs have no
//! hardware counters) around one fixed-load measurement, summarised by `perf report` into text:
//! the share of each command, then the hottest symbols by command.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub struct Perf {
    child: Child,
    data: PathBuf,
}

/// Starts system-wide sampling into `data` for `secs` seconds (perf times itself with `sleep`, so
/// it ends cleanly without a signal); returns once perf has written its header.
pub fn start(data: &Path, secs: f64) -> Result<Perf> {
    let _ = fs::remove_file(data);
    let child = Command::new("perf")
        .args(["record", "-a", "-g", "-e", "cpu-clock", "-F", "999", "-o"])
        .arg(data)
        .args(["--", "sleep", &format!("{secs:.2}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record (Debian package linux-perf)")?;
    let mut p = Perf {
        child,
        data: data.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::metadata(data).map_or(true, |m| m.len() == 0) {
        if let Some(status) = p.child.try_wait()? {
            bail!("perf record exited at once ({status})");
        }
        if Instant::now() > deadline {
            bail!("perf record wrote nothing in 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(p)
}

impl Perf {
    /// Waits for the sampling to end and writes the summary to `out` under `title`.
    pub fn finish(mut self, out: &Path, title: &str) -> Result<()> {
        let status = self.child.wait()?;
        if !status.success() {
            bail!("perf record ended with {status}");
        }
        let report = |sort: &str, limit: &str| -> Result<String> {
            let o = Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "-g",
                    "none",
                    "--sort",
                    sort,
                    "--percent-limit",
                    limit,
                    "-i",
                ])
                .arg(&self.data)
                .output()?;
            Ok(String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .take(40)
                .collect::<Vec<_>>()
                .join("\n"))
        };
        let text = format!(
            "# {title}\n\n## share of samples by command\n\n{}\n\n## hottest symbols (command, symbol; at least 0.5 %)\n\n{}\n",
            report("comm", "0.5")?,
            report("comm,sym", "0.5")?
        );
        fs::write(out, text)?;
        let _ = fs::remove_file(&self.data);
        Ok(())
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
