//! The Autobahn TestSuite's cases, run by an independent Python 3 runner, kosoku (PyPI `kosoku`,
//! installed by `cargo xtask setup`), against Node's `ws` echo server directly and through the
//! proxy in every relay mode: every case must end the same way through the proxy as directly,
//! both Autobahn verdicts (the message exchange and the close) and the close code each end sent
//! (`tests/interop/autobahn_run.py`, `node_echo_server.js`). kosoku's reports (JSON and HTML per
//! case) are left in `target/interop/autobahn-<run>/` for CI to keep.
//!
//! The server is Node's `ws` and not `wsproxy echo-server` because it implements
//! permessage-deflate: the 12.x and 13.x cases then negotiate compression through the proxy, and
//! exchange a thousand compressed messages each, where `echo-server` would end them at once as
//! UNIMPLEMENTED.
//!
//! The cases: all of 1.x to 10.x (framing, pings and pongs, reserved bits, opcodes,
//! fragmentation, UTF-8, close handling, messages of up to 16 MiB, autofragmentation); of the
//! compression cases, 12.1 at each of its 18 sizes and fragmentations (16 B to 128 KiB, fragments
//! of 256 B to 32 KiB), and the other four data sets (12.2 to 12.5) and all seven negotiations
//! (13.1 to 13.7) at the four smallest sizes (16 B to 1 KiB): 363 of the 517. The rest of 12.x
//! and 13.x is left out for time alone: their 1000 round trips of messages up to 128 KiB, many
//! cut into 256-byte fragments, are CPU work for the Node server (7.5 min of its CPU per run of
//! the whole suite). On the 2-CPU machine measured, a run of the whole suite took 7 min four
//! cases at a time (11 min one at a time), and all 517 ended the same through every relay as
//! directly; the selection takes 25 to 45 s per run, the test about 2.5 min.
//!
//! kosoku 0.1.0 cannot finish 12 of the cases, 13.2, 13.5, 13.6 and 13.7 at 16 to 256 B: they
//! end in ERROR "Strings must be encoded before hashing" (its Python 3 port of the case hashes a
//! `str`) once the first echo arrives, directly as through the proxy. They are compared with
//! that reason, so a failed connection, also an ERROR, cannot pass for them.
//!
//! `WSP_AUTOBAHN_CASES` replaces the selection (case ids and `*` globs separated by spaces; "*"
//! runs the whole suite, half an hour for the four runs).
//!
//! No case is excluded as timing-dependent: every case had the same verdicts and close codes in
//! three direct runs of the whole suite four at a time and in ten of the selection (one, four
//! and eight at a time), and the same verdicts in a run of the whole suite one at a time.
//!
//! Without kosoku or Node's `ws` the test fails under CI=true and says it was skipped elsewhere.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wsproxy_tests::DEADLINE;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::interop_kit;
use wsproxy_tests::relay_kit::{poll_until, say};

/// Cases run at once: with 4 the selection takes half the time of one at a time (26 s, 52 s),
/// with the same outcomes; 8 gains nothing more on 2 CPUs.
const CONCURRENCY: usize = 4;
/// A run of the selection takes 25 to 45 s.
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// With `WSP_AUTOBAHN_CASES`: the whole suite took 6.5 to 7.5 min per run.
const CHOSEN_RUN_LIMIT: Duration = Duration::from_secs(1800);

/// The selection, in kosoku's terms (case ids, `*` for any part): see the module doc.
fn cases() -> Vec<String> {
    if let Ok(chosen) = std::env::var("WSP_AUTOBAHN_CASES") {
        return chosen.split_whitespace().map(String::from).collect();
    }
    let mut cases: Vec<String> = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*", "12.1.*"]
        .map(String::from)
        .to_vec();
    for (group, sets) in [(12, 2..=5), (13, 1..=7)] {
        for set in sets {
            cases.extend((1..=4).map(|size| format!("{group}.{set}.{size}")));
        }
    }
    cases
}

fn kosoku() -> bool {
    interop_kit::installed(
        std::process::Command::new("python3").args(["-c", "import kosoku"]),
        "kosoku (PyPI)",
    )
}

/// How one case ended: Autobahn's verdicts on the exchange and on the close, the close codes the
/// server and kosoku sent ("-" for none), and for ERROR, kosoku's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    behavior: String,
    close: String,
    remote_code: String,
    local_code: String,
    reason: String,
}

struct Run {
    cases: BTreeMap<String, Outcome>,
    seconds: f64,
}

/// Runs the selection against `addr`; `what` names the run and its report directory.
async fn run_cases(addr: SocketAddr, what: &str) -> Run {
    let reports = interop_kit::artifacts().join(format!("autobahn-{what}"));
    // Reports of an earlier run with another selection would otherwise sit among these.
    let _ = std::fs::remove_dir_all(&reports);
    let limit = if std::env::var_os("WSP_AUTOBAHN_CASES").is_some() {
        CHOSEN_RUN_LIMIT
    } else {
        RUN_LIMIT
    };
    let start = Instant::now();
    let mut kosoku = tokio::process::Command::new("python3");
    kosoku
        .arg(interop_kit::script("autobahn_run.py"))
        .arg(format!("ws://{addr}/"))
        .arg(CONCURRENCY.to_string())
        .arg(&reports)
        .args(cases());
    let stdout = interop_kit::stdout_of(&mut kosoku, limit, &format!("{what}: kosoku")).await;
    let mut cases = BTreeMap::new();
    let mut summary = None;
    for line in stdout.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["case", id, behavior, close, remote_code, local_code, ref reason @ ..] => {
                let outcome = Outcome {
                    behavior: behavior.into(),
                    close: close.into(),
                    remote_code: remote_code.into(),
                    local_code: local_code.into(),
                    reason: reason.join(" "),
                };
                assert!(cases.insert(id.to_string(), outcome).is_none(), "{what}: {id} twice");
            }
            ["summary", n, _] => summary = n.parse::<usize>().ok(),
            _ => panic!("{what}: kosoku's driver said {line:?}"),
        }
    }
    assert_eq!(summary, Some(cases.len()), "{what}: {stdout}");
    Run {
        cases,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// "OK 480, NON-STRICT 4, ...": how many cases got each verdict on the exchange.
fn verdicts(run: &Run) -> String {
    let mut counts = BTreeMap::<&str, usize>::new();
    for o in run.cases.values() {
        *counts.entry(o.behavior.as_str()).or_default() += 1;
    }
    let list: Vec<String> = counts.iter().map(|(b, n)| format!("{b} {n}")).collect();
    list.join(", ")
}

#[tokio::test]
async fn autobahn_cases_end_the_same_through_every_relay_as_directly() {
    if !kosoku() || !interop_kit::node_ws() {
        return;
    }
    let (_server, upstream) = interop_kit::node_echo_server().await;
    let direct = run_cases(upstream, "direct").await;
    say(&format!(
        "autobahn direct: {} cases in {:.0} s; {}",
        direct.cases.len(),
        direct.seconds,
        verdicts(&direct)
    ));
    let n = direct.cases.len() as u64;
    for mode in ["userspace", "kernel", "auto"] {
        let Some(p) = ServerProxy::in_mode(mode, upstream, "").await else {
            continue;
        };
        let through = run_cases(p.addr, mode).await;
        assert_eq!(
            through.cases.keys().collect::<Vec<_>>(),
            direct.cases.keys().collect::<Vec<_>>(),
            "{mode}: the same cases"
        );
        let differences: Vec<String> = direct
            .cases
            .iter()
            .filter(|(id, o)| through.cases[*id] != **o)
            .map(|(id, o)| format!("{id}: directly {o:?}, through the proxy {:?}", through.cases[id]))
            .collect();
        assert!(
            differences.is_empty(),
            "{mode}: {} of {n} cases ended otherwise through the proxy:\n{}",
            differences.len(),
            differences.join("\n")
        );
        // One connection per case, every one ended, none lost to the kernel relay's faults; in
        // the relay asked for (index: kernel 0, userspace 1), while `auto` moves those that turn
        // to a run of small messages (the 12.x and 13.x cases' thousand echoes).
        let t = poll_until(DEADLINE, || {
            let t = p.server.totals();
            (t.open == [0, 0] && t.ended.iter().sum::<u64>() == n).then_some(t)
        })
        .await
        .unwrap_or_else(|| panic!("{mode}: not {n} connections ended: {:?}", p.server.totals()));
        assert_eq!(t.stream_faults, 0, "{mode}: {t:?}");
        match mode {
            "userspace" => assert_eq!((t.ended[0], t.promotions, t.fallbacks), (0, 0, 0), "{mode}: {t:?}"),
            "kernel" => assert_eq!((t.ended[1], t.fallbacks), (0, 0), "{mode}: {t:?}"),
            // A case can close in the instant of its promotion: the kernel relay then declines
            // the pair (the map takes established sockets only) and userspace carries it to the
            // end. That and only that may fall back.
            _ => assert!(
                t.promotions > 0 && t.fallbacks == t.fallbacks_peer_closed && t.ended[0] + t.fallbacks == t.promotions,
                "{mode}: {t:?}"
            ),
        }
        say(&format!(
            "autobahn {mode}: {} cases in {:.0} s, {} differences; {}; relays (kernel, userspace) {:?}, {} moved to the kernel",
            through.cases.len(),
            through.seconds,
            differences.len(),
            verdicts(&through),
            t.ended,
            t.promotions
        ));
        p.stop().await;
    }
}
