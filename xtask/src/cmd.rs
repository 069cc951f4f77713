//! A command line as data: built by the pure planning code, shown to the user, then run.

use std::fmt;
use std::io;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};

use anyhow::{Context as _, Result, bail};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Cmd {
    pub fn new(program: &str) -> Self {
        Self {
            program: program.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs with inherited stdio in `dir`; any failure names this command.
    pub fn run_in(&self, dir: &Path) -> Result<()> {
        let status = self.status_in(dir)?;
        if !status.success() {
            bail!("`{self}` failed ({status})");
        }
        Ok(())
    }

    /// Runs with inherited stdio in `dir` and returns its status, failing only if it cannot start.
    pub fn status_in(&self, dir: &Path) -> Result<ExitStatus> {
        self.command()
            .current_dir(dir)
            .stdin(Stdio::inherit())
            .status()
            .with_context(|| format!("could not start `{self}`"))
    }

    /// Runs quietly and captures its output; `Ok(None)` when the program does not exist.
    pub fn probe(&self) -> Result<Option<Output>> {
        match self.command().stdin(Stdio::null()).output() {
            Ok(output) => Ok(Some(output)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("could not start `{self}`")),
        }
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words = self.env.iter().map(|(k, v)| format!("{k}={}", quote(v)));
        let words = words
            .chain(std::iter::once(quote(&self.program)))
            .chain(self.args.iter().map(|a| quote(a)));
        f.write_str(&words.collect::<Vec<_>>().join(" "))
    }
}

/// Quotes a word for display the way a POSIX shell would need it.
fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_env_then_a_shell_ready_line() {
        let cmd = Cmd::new("cargo")
            .args(["install", "a b", "it's"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22");
        assert_eq!(
            cmd.to_string(),
            r"LLVM_PREFIX=/usr/lib/llvm-22 cargo install 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn probe_reports_a_missing_program_as_none() {
        let cmd = Cmd::new("wsproxy-xtask-no-such-program");
        assert!(cmd.probe().unwrap().is_none());
    }
}
