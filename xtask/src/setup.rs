//! Prerequisites that a fresh Debian machine lacks: probe them, plan the installs (pure), apply.
//!
//! - the nightly toolchain with `rust-src` (aya-build compiles the eBPF crate with `-Z build-std`)
//! - the Debian packages of LLVM 22 that `bpf-linker` links against, Node.js with its `ws` module
//!   and Chromium (independent clients and a server for the interop tests), HAProxy (a real
//!   PROXY protocol sender in front of the proxy in the tests), Redis (the store of the cluster
//!   limits: the cluster tests start their own servers, `cargo xtask cluster` one for a fleet)
//! - `bpf-linker`, built from crates.io against that LLVM
//! - from PyPI: `websockets`, a WebSocket client to try the proxy with (`python3 -m websockets`)
//!   and for the interop tests, and `kosoku`, a runner of the Autobahn cases

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::cmd::Cmd;

pub const NIGHTLY: &str = "nightly";
pub const DEBS: [&str; 7] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "nodejs",
    "node-ws",
    "chromium",
    "haproxy",
    "redis-server",
];
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// apt waits this long (seconds) for another install to release dpkg's lock instead of failing.
pub const APT_LOCK_WAIT: &str = "DPkg::Lock::Timeout=600";
/// The PyPI packages, each as (module to import, requirement to install): the client `cargo xtask
/// run` suggests, and the Autobahn runner of the interop tests (pinned: its case list is compared
/// between runs).
pub const PY_PACKAGES: [(&str, &str); 2] = [("websockets", "websockets"), ("kosoku", "kosoku==0.1.0")];
/// Where `llvm-22-dev` puts LLVM. bpf-linker's build looks for `llvm-config` on PATH otherwise,
/// which on Debian can be another LLVM's (`/usr/bin/llvm-config` from the `llvm` package).
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nightly {
    Missing,
    WithoutRustSrc,
    Ready,
}

/// What is on the machine now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub nightly: Nightly,
    pub missing_debs: Vec<String>,
    pub bpf_linker: bool,
    /// The requirements of [`PY_PACKAGES`] whose module `python3` cannot import.
    pub missing_py: Vec<String>,
}

/// One prerequisite and the commands that install it (none when it is present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub item: String,
    pub install: Vec<Cmd>,
}

impl Step {
    pub fn is_ok(&self) -> bool {
        self.install.is_empty()
    }

    pub fn line(&self) -> String {
        if self.is_ok() {
            format!("setup: {}: ok", self.item)
        } else {
            let cmds: Vec<String> = self.install.iter().map(Cmd::to_string).collect();
            format!("setup: {}: installing ({})", self.item, cmds.join(" && "))
        }
    }
}

/// The decision: which commands install what `probe` found missing, in dependency order
/// (bpf-linker builds against the LLVM packages).
pub fn plan(probe: &Probe) -> Vec<Step> {
    let nightly = match probe.nightly {
        Nightly::Ready => vec![],
        Nightly::WithoutRustSrc => {
            vec![Cmd::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY])]
        }
        Nightly::Missing => vec![Cmd::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])],
    };
    let debs = if probe.missing_debs.is_empty() {
        vec![]
    } else {
        vec![
            Cmd::new("apt-get").args(["-o", APT_LOCK_WAIT, "update"]),
            Cmd::new("apt-get")
                .args(["-o", APT_LOCK_WAIT, "install", "-y"])
                .args(&probe.missing_debs),
        ]
    };
    let bpf_linker = if probe.bpf_linker {
        vec![]
    } else {
        // --force: reinstall over a binary that exists but no longer runs (e.g. its LLVM is gone).
        vec![
            Cmd::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
                .args(["--force", "--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        ]
    };
    let python = if probe.missing_py.is_empty() {
        vec![]
    } else {
        vec![
            Cmd::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--root-user-action=ignore"])
                .args(&probe.missing_py),
        ]
    };
    vec![
        Step {
            item: format!("{NIGHTLY} toolchain with rust-src"),
            install: nightly,
        },
        Step {
            item: format!("Debian packages {}", DEBS.join(" ")),
            install: debs,
        },
        Step {
            item: "bpf-linker".to_owned(),
            install: bpf_linker,
        },
        Step {
            item: format!("Python packages {}", PY_PACKAGES.map(|(module, _)| module).join(" ")),
            install: python,
        },
    ]
}

/// Reads `rustup component list --toolchain nightly --installed`.
pub fn parse_nightly(listed: bool, stdout: &str) -> Nightly {
    if !listed {
        Nightly::Missing
    } else if stdout
        .lines()
        .map(str::trim)
        .any(|l| l == "rust-src" || l.starts_with("rust-src-"))
    {
        Nightly::Ready
    } else {
        Nightly::WithoutRustSrc
    }
}

/// Reads `dpkg -s PACKAGE`: installed only when its status says so (not just config files left).
pub fn parse_deb_installed(known: bool, stdout: &str) -> bool {
    known
        && stdout.lines().any(|l| {
            l.strip_prefix("Status:")
                .is_some_and(|s| s.trim() == "install ok installed")
        })
}

pub fn probe() -> Result<Probe> {
    let rustup = Cmd::new("rustup")
        .args(["component", "list", "--toolchain", NIGHTLY, "--installed"])
        .env("RUSTUP_AUTO_INSTALL", "0");
    let out = rustup
        .probe()?
        .context("rustup not found: setup needs rustup to add the nightly toolchain")?;
    let nightly = parse_nightly(out.status.success(), &String::from_utf8_lossy(&out.stdout));

    let mut missing_debs = Vec::new();
    for deb in DEBS {
        let out = Cmd::new("dpkg")
            .args(["-s", deb])
            .probe()?
            .context("dpkg not found: setup installs Debian packages with apt and supports Debian only")?;
        if !parse_deb_installed(out.status.success(), &String::from_utf8_lossy(&out.stdout)) {
            missing_debs.push(deb.to_owned());
        }
    }

    let bpf_linker = Cmd::new("bpf-linker")
        .args(["--version"])
        .probe()?
        .is_some_and(|out| out.status.success());

    let mut missing_py = Vec::new();
    for (module, requirement) in PY_PACKAGES {
        let imports = Cmd::new("python3")
            .args(["-c", &format!("import {module}")])
            .probe()?
            .is_some_and(|out| out.status.success());
        if !imports {
            missing_py.push(requirement.to_owned());
        }
    }

    Ok(Probe {
        nightly,
        missing_debs,
        bpf_linker,
        missing_py,
    })
}

/// `cargo xtask setup`: one line per prerequisite, installing only what is missing.
pub fn setup(root: &Path, dry_run: bool) -> Result<()> {
    let steps = plan(&probe()?);
    if dry_run {
        for step in &steps {
            let line = step.line().replacen(": installing (", ": would install (", 1);
            println!("{line}");
        }
        return Ok(());
    }
    apply(root, &steps)
}

/// Before build, run and test: installs only when something is missing, silent otherwise.
pub fn ensure(root: &Path) -> Result<()> {
    let steps = plan(&probe()?);
    if steps.iter().all(Step::is_ok) {
        return Ok(());
    }
    println!("setup: this machine lacks prerequisites; installing them");
    apply(root, &steps)
}

fn apply(root: &Path, steps: &[Step]) -> Result<()> {
    for step in steps {
        println!("{}", step.line());
        for cmd in &step.install {
            cmd.run_in(root)
                .with_context(|| format!("setup step failed: {}", step.item))?;
        }
    }
    let still_missing: Vec<String> = plan(&probe()?)
        .into_iter()
        .filter(|s| !s.is_ok())
        .map(|s| s.item)
        .collect();
    if !still_missing.is_empty() {
        let hint = if still_missing.iter().any(|item| item == "bpf-linker") {
            " (bpf-linker is installed into ~/.cargo/bin: is it on PATH?)"
        } else {
            ""
        };
        bail!(
            "setup: still missing after installing: {}{hint}",
            still_missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_present() -> Probe {
        Probe {
            nightly: Nightly::Ready,
            missing_debs: vec![],
            bpf_linker: true,
            missing_py: vec![],
        }
    }

    fn lines(probe: &Probe) -> Vec<String> {
        plan(probe).iter().map(Step::line).collect()
    }

    #[test]
    fn nothing_missing_installs_nothing() {
        let steps = plan(&all_present());
        assert_eq!(steps.len(), 4);
        assert!(steps.iter().all(Step::is_ok));
        assert_eq!(
            lines(&all_present()),
            [
                "setup: nightly toolchain with rust-src: ok",
                "setup: Debian packages llvm-22-dev libpolly-22-dev nodejs node-ws chromium haproxy redis-server: ok",
                "setup: bpf-linker: ok",
                "setup: Python packages websockets kosoku: ok",
            ]
        );
    }

    #[test]
    fn fresh_machine_installs_everything_in_order() {
        let fresh = Probe {
            nightly: Nightly::WithoutRustSrc,
            missing_debs: DEBS.map(String::from).to_vec(),
            bpf_linker: false,
            missing_py: PY_PACKAGES.map(|(_, r)| r.to_owned()).to_vec(),
        };
        let cmds: Vec<String> = plan(&fresh)
            .iter()
            .flat_map(|s| &s.install)
            .map(Cmd::to_string)
            .collect();
        assert_eq!(
            cmds,
            [
                "rustup component add rust-src --toolchain nightly",
                "apt-get -o DPkg::Lock::Timeout=600 update",
                "apt-get -o DPkg::Lock::Timeout=600 install -y llvm-22-dev libpolly-22-dev nodejs node-ws chromium haproxy redis-server",
                "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked \
                 --force --no-default-features --features llvm-22",
                "python3 -m pip install --quiet --root-user-action=ignore websockets kosoku==0.1.0",
            ]
        );
    }

    #[test]
    fn missing_nightly_installs_the_toolchain_with_rust_src() {
        let probe = Probe {
            nightly: Nightly::Missing,
            ..all_present()
        };
        let steps = plan(&probe);
        assert_eq!(
            steps[0].install,
            [Cmd::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src"
            ])]
        );
        assert!(steps[1..].iter().all(Step::is_ok));
    }

    #[test]
    fn only_the_missing_package_is_installed_after_one_update() {
        let probe = Probe {
            missing_debs: vec!["libpolly-22-dev".into()],
            ..all_present()
        };
        let steps = plan(&probe);
        assert!(steps[0].is_ok() && steps[2].is_ok());
        let cmds: Vec<String> = steps[1].install.iter().map(Cmd::to_string).collect();
        assert_eq!(
            cmds,
            [
                "apt-get -o DPkg::Lock::Timeout=600 update",
                "apt-get -o DPkg::Lock::Timeout=600 install -y libpolly-22-dev"
            ]
        );
    }

    #[test]
    fn only_bpf_linker_missing() {
        let steps = plan(&Probe {
            bpf_linker: false,
            ..all_present()
        });
        assert!(steps[..2].iter().all(Step::is_ok) && steps[3].is_ok());
        assert_eq!(steps[2].install.len(), 1);
        assert_eq!(
            steps[2].install[0].env,
            [("LLVM_PREFIX".to_owned(), LLVM_PREFIX.to_owned())]
        );
        assert!(
            steps[2]
                .line()
                .starts_with("setup: bpf-linker: installing (LLVM_PREFIX=")
        );
    }

    #[test]
    fn parses_rustup_component_list() {
        let listed = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert_eq!(parse_nightly(true, listed), Nightly::Ready);
        assert_eq!(
            parse_nightly(true, "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64\n"),
            Nightly::WithoutRustSrc
        );
        assert_eq!(parse_nightly(false, ""), Nightly::Missing);
    }

    #[test]
    fn parses_dpkg_status() {
        let installed = "Package: llvm-22-dev\nStatus: install ok installed\nPriority: optional\n";
        assert!(parse_deb_installed(true, installed));
        assert!(!parse_deb_installed(
            true,
            "Package: x\nStatus: deinstall ok config-files\n"
        ));
        assert!(!parse_deb_installed(false, ""));
    }
}
