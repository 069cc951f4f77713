//! Privileged smoke test of the kernel relay: load and attach the verdict, relay a pair of
//! loopback connections both ways (including bytes queued before insertion), then take the pair
//! out and check that both maps are empty.
//!
//! Needs CAP_BPF and CAP_NET_ADMIN (root). Without them (or on a kernel without sockmap support)
//! it fails when CI=true and is skipped with a message otherwise.

use std::{
    io::Write as _,
    net::{Shutdown, TcpStream},
};

mod common;

use common::kernel::{UNLIMITED, assert_nothing_to_read, expect_bytes, load_or_skip, loopback_pair};
use wsproxy::ebpf::{PairCounters, SocketCounters};

/// Blocks until `stream` has `len` bytes queued, without consuming them.
fn wait_queued(stream: &TcpStream, len: usize) {
    let mut buf = vec![0; len];
    loop {
        match stream.peek(&mut buf) {
            Ok(n) if n >= len => return,
            Ok(0) => panic!("peer closed before {len} bytes were queued"),
            Ok(_) => {}
            Err(e) => panic!("waiting for {len} queued bytes: {e}"),
        }
    }
}

#[test]
fn verdict_relays_a_pair_both_ways_and_leaves_no_entries() {
    let Some(programs) = load_or_skip() else {
        return;
    };
    assert_eq!(programs.map_entry_counts(), (0, 0, 0), "maps start empty");

    // client <-> proxy_a (accepted by the proxy), proxy_b (connected by the proxy) <-> upstream.
    let (mut client, mut proxy_a) = loopback_pair();
    let (mut proxy_b, mut upstream) = loopback_pair();

    // Queued before insertion: a greeting from the upstream and bytes from the client. Without
    // the kick they would stay queued until the next segment arrives.
    upstream.write_all(b"EARLY").expect("upstream write");
    client.write_all(b"hello").expect("client write");
    wait_queued(&proxy_b, 5);
    wait_queued(&proxy_a, 5);

    let pair = programs
        .insert_pair(&proxy_a, &proxy_b, UNLIMITED)
        .expect("insert_pair");
    assert_eq!(programs.map_entry_counts(), (2, 2, 2));

    expect_bytes(&mut client, b"EARLY", "queued upstream bytes reach the client");
    expect_bytes(&mut upstream, b"hello", "queued client bytes reach the upstream");

    let up = b"LATE: a frame from the upstream";
    let down = b"a frame from the client";
    upstream.write_all(up).expect("upstream write");
    client.write_all(down).expect("client write");
    expect_bytes(&mut client, up, "later upstream bytes reach the client");
    expect_bytes(&mut upstream, down, "later client bytes reach the upstream");

    assert_nothing_to_read(&mut proxy_a, "client-side proxy socket");
    assert_nothing_to_read(&mut proxy_b, "upstream-side proxy socket");

    let live = pair.counters();
    let counters = pair.remove().expect("remove");
    assert_eq!(live, counters, "no bytes moved after the last read");
    let expected = PairCounters {
        from_client: SocketCounters {
            redirected: (5 + down.len()) as u64,
            passed: 0,
            repeated: 0,
            broken: 0,
        },
        from_upstream: SocketCounters {
            redirected: (5 + up.len()) as u64,
            passed: 0,
            repeated: 0,
            broken: 0,
        },
    };
    assert_eq!(counters, expected);
    assert_eq!(programs.map_entry_counts(), (0, 0, 0), "removal leaves no entries");

    // Out of the maps, the proxy-side sockets are plain sockets again.
    client.write_all(b"plain").expect("client write");
    expect_bytes(&mut proxy_a, b"plain", "after removal, userspace reads the client");
    for stream in [&client, &proxy_a, &proxy_b, &upstream] {
        let _ = stream.shutdown(Shutdown::Both);
    }

    // Dropping the guard (the path taken on errors and panics) also empties both maps.
    let (_client, proxy_a) = loopback_pair();
    let (proxy_b, _upstream) = loopback_pair();
    let pair = programs
        .insert_pair(&proxy_a, &proxy_b, UNLIMITED)
        .expect("insert_pair");
    assert_eq!(programs.map_entry_counts(), (2, 2, 2));
    drop(pair);
    assert_eq!(
        programs.map_entry_counts(),
        (0, 0, 0),
        "dropping the guard leaves no entries"
    );
}
