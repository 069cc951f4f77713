//! What putting a pair under the kernel relay and taking it out again costs, measured directly:
//! `cargo run --release -p wsproxy --example pair_cost [PAIRS]` (as root). Loads the programs,
//! then for each of PAIRS fresh loopback socket pairs times `insert_pair` (cookies, slots,
//! index, socket map, kick) and `remove` (socket map, index, slots), and prints the median and
//! the 99th percentile of each in microseconds, with the mean system calls' share left to the
//! reader's `strace -c`.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use wsproxy::ebpf::{KernelPrograms, Window};

fn main() {
    let pairs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let programs = match KernelPrograms::load() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kernel relay unavailable: {e:#}");
            std::process::exit(1);
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let connected = || {
        let a = TcpStream::connect(addr).expect("connect");
        let (b, _) = listener.accept().expect("accept");
        (a, b)
    };
    let window = Window {
        bytes: 4 << 20,
        skbs: 256,
    };
    let (mut insert, mut remove) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
    for _ in 0..pairs {
        let (_client, proxy_a) = connected();
        let (proxy_b, _upstream) = connected();
        let t = Instant::now();
        let pair = programs.insert_pair(&proxy_a, &proxy_b, window).expect("insert");
        insert.push(t.elapsed());
        let t = Instant::now();
        pair.remove().expect("remove");
        remove.push(t.elapsed());
    }
    for (what, mut times) in [("insert", insert), ("remove", remove)] {
        times.sort_unstable();
        let at = |q: f64| micros(times[((times.len() - 1) as f64 * q) as usize]);
        println!(
            "{what}: median {:.1} us, p99 {:.1} us over {pairs} pairs",
            at(0.5),
            at(0.99)
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
