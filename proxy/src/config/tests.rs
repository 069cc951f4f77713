use std::path::{Path, PathBuf};
use std::time::Duration;

use super::admin::MAX_UNIX_PATH;
use super::*;

const MINIMAL: &str = "[upstreams]\nmain = [{ address = \"127.0.0.1:9001\" }]\n";

#[test]
fn minimal_file_gets_defaults() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    let s = &c.services[0];
    assert_eq!(c.listeners(), ["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!(s.handshake.max_head_bytes, 16384);
    assert_eq!(s.handshake.max_headers, 100);
    assert_eq!(s.handshake.header_timeout, Duration::from_secs(10));
    assert_eq!(s.upstreams.timeout, Duration::from_secs(5));
    assert_eq!(s.limits.ipv6_prefix, 64);
    assert_eq!(s.headers.underscore_headers, UnderscoreHeaders::Drop);
    assert_eq!(s.relay.mode, RelayMode::Auto);
    assert_eq!(s.relay.max_in_flight_bytes, 4 * 1024 * 1024);
    assert_eq!(s.relay.drain_timeout, Duration::from_secs(10));
    assert_eq!(s.relay.send_timeout, Duration::from_secs(60));
    assert_eq!(s.relay.client_sndbuf, None);
    assert_eq!(s.upstreams.main[0].weight, 1);
}

#[test]
fn count_5xx_is_off_by_default_and_can_be_set() {
    assert!(
        !Config::parse(MINIMAL, "t").unwrap().services[0]
            .upstreams
            .health
            .count_5xx
    );
    let on = format!("{MINIMAL}[upstreams.health]\ncount_5xx = true\n");
    assert!(Config::parse(&on, "t").unwrap().services[0].upstreams.health.count_5xx);
    let bad = format!("{MINIMAL}[upstreams.health]\ncount_5xx = \"yes\"\n");
    assert!(Config::parse(&bad, "t").is_err());
}

#[test]
fn unknown_field_is_refused_by_name() {
    let e = Config::parse(&format!("{MINIMAL}[limits]\nrequests_per_secnd = 3\n"), "t").unwrap_err();
    assert!(e.to_string().contains("requests_per_secnd"), "{e}");
}

#[test]
fn every_bad_value_is_reported_at_once() {
    let text = r#"
[listen]
address = "nowhere"
[limits]
burst = 0
ipv6_prefix = 129
[handshake]
max_headers = 2
header_timeout = "0s"
[headers]
add = [{ name = "Bad Name", value = "x" }]
[upstreams]
main = [{ address = "127.0.0.1:9001", weight = 0 }]
backup = [{ address = "127.0.0.1:9001" }]
"#;
    let e = Config::parse(text, "t").unwrap_err();
    let fields = [
        "listen.address",
        "limits.burst",
        "limits.ipv6_prefix",
        "handshake.max_headers",
        "handshake.header_timeout",
        "headers.add[0].name",
        "upstreams.main:",
        "upstreams.backup[0].address",
    ];
    for f in fields {
        assert!(e.problems.iter().any(|p| p.starts_with(f)), "no problem for {f}: {e}");
    }
    assert_eq!(e.problems.len(), fields.len(), "{e}");
}

#[test]
fn relay_limits_are_checked_by_field() {
    let text = format!(
        "{MINIMAL}[relay]\nsend_timeout = \"500ms\"\nclient_sndbuf = 100\nupstream_rcvbuf = 4294967295\nclient_rcvbuf = 65536\npark_after = \"5ms\"\n"
    );
    let e = Config::parse(&text, "t").unwrap_err();
    let fields = [
        "relay.send_timeout",
        "relay.client_sndbuf",
        "relay.upstream_rcvbuf",
        "relay.park_after",
    ];
    for f in fields {
        assert!(e.problems.iter().any(|p| p.starts_with(f)), "no problem for {f}: {e}");
    }
    assert_eq!(e.problems.len(), fields.len(), "{e}");
    let c = Config::parse(
        &format!("{MINIMAL}[relay]\nsend_timeout = \"0s\"\npark_after = \"0s\"\n"),
        "t",
    )
    .unwrap();
    assert!(c.services[0].relay.send_timeout.is_zero());
    assert!(c.services[0].relay.park_after.is_zero());
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.services[0].relay.park_after, Duration::from_millis(500));
}

/// A file in a fresh directory of the temp dir, with `text`.
fn temp_file(name: &str, text: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wsproxy-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn admin_defaults() {
    let c = Config::parse(&format!("{MINIMAL}[admin]\naddress = \"127.0.0.1:9090\"\n"), "t").unwrap();
    let a = c.admin.unwrap();
    assert_eq!(a.address, AdminAddress::Tcp("127.0.0.1:9090".parse().unwrap()));
    assert_eq!(a.idle_timeout, Duration::from_secs(10));
    assert_eq!(a.max_connections, 64);
    assert_eq!((&a.token_file, &a.token), (&None, &None));
    assert_eq!(a, Admin::new(a.address.clone()));
    // No address: no admin listener, whatever else is set.
    assert!(
        Config::parse(&format!("{MINIMAL}[admin]\nmax_connections = 8\n"), "t")
            .unwrap()
            .admin
            .is_none()
    );
}

#[test]
fn admin_settings_and_a_unix_socket_address() {
    let token = temp_file("token-ok", b"  s3cr3t-t0ken\n");
    let text = format!(
        "{MINIMAL}[admin]\naddress = \"unix:/run/wsproxy/admin.sock\"\nidle_timeout = \"250ms\"\n\
         max_connections = 8\ntoken_file = {:?}\n",
        token.display().to_string()
    );
    let a = Config::parse(&text, "t").unwrap().admin.unwrap();
    assert_eq!(a.address, AdminAddress::Unix("/run/wsproxy/admin.sock".into()));
    assert_eq!(a.address.to_string(), "unix:/run/wsproxy/admin.sock");
    assert_eq!(a.idle_timeout, Duration::from_millis(250));
    assert_eq!(a.max_connections, 8);
    assert_eq!(a.token.as_ref().map(Token::as_str), Some("s3cr3t-t0ken"));
    assert_eq!(a.token_file, Some(token));
    // The token never shows in the configuration's Debug form.
    assert!(!format!("{a:?}").contains("s3cr3t"), "{a:?}");
}

#[test]
fn bad_admin_values_are_each_reported_by_field() {
    let text = format!(
        "{MINIMAL}[admin]\naddress = \"unix:relative.sock\"\nidle_timeout = \"0s\"\nmax_connections = 0\n\
         token_file = \"/nonexistent/wsproxy-token\"\n"
    );
    let e = Config::parse(&text, "t").unwrap_err();
    let fields = [
        "admin.address",
        "admin.idle_timeout",
        "admin.max_connections",
        "admin.token_file",
    ];
    for f in fields {
        assert!(e.problems.iter().any(|p| p.starts_with(f)), "no problem for {f}: {e}");
    }
    assert_eq!(e.problems.len(), fields.len(), "{e}");
    let long = format!("unix:/{}", "x".repeat(MAX_UNIX_PATH));
    for (address, why) in [
        ("localhost:9090", "not an IP address"),
        ("9090", "not an IP address"),
        (long.as_str(), "longer than"),
    ] {
        let e = Config::parse(&format!("{MINIMAL}[admin]\naddress = {address:?}\n"), "t").unwrap_err();
        assert!(
            e.problems.len() == 1 && e.problems[0].starts_with("admin.address") && e.problems[0].contains(why),
            "{address}: {e}"
        );
    }
    for bad in ["idle_timeout = \"2h\"", "max_connections = 5000", "idle_timeout = 3"] {
        assert!(
            Config::parse(&format!("{MINIMAL}[admin]\n{bad}\n"), "t").is_err(),
            "{bad}"
        );
    }
}

#[test]
fn an_unusable_token_file_is_a_problem_of_admin_token_file() {
    let empty = temp_file("token-empty", b" \n\n");
    let spaces = temp_file("token-spaces", b"two words\n");
    let large = temp_file("token-large", &[b'a'; 5000]);
    let unreadable = temp_file("token-unreadable", b"t\n");
    std::fs::set_permissions(&unreadable, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let dir = empty.parent().unwrap().to_path_buf();
    let fifo = dir.join("token-fifo");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut cases = vec![
        (empty.display().to_string(), "is empty"),
        (spaces.display().to_string(), "without spaces"),
        (large.display().to_string(), "longer than"),
        (dir.display().to_string(), "not a regular file"),
        // Nobody writes to it: refused at once, not waited on.
        (fifo.display().to_string(), "not a regular file"),
        ("/dev/zero".to_string(), "not a regular file"),
        ("relative/token".to_string(), "absolute path"),
        ("/nonexistent/token".to_string(), "cannot read"),
    ];
    // Root reads any file whatever its mode.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        cases.push((unreadable.display().to_string(), "cannot read"));
    }
    for (path, why) in cases {
        let text = format!("{MINIMAL}[admin]\naddress = \"127.0.0.1:9090\"\ntoken_file = {path:?}\n");
        let e = Config::parse(&text, "t").unwrap_err();
        assert_eq!(e.problems.len(), 1, "{path}: {e}");
        assert!(
            e.problems[0].starts_with("admin.token_file") && e.problems[0].contains(why),
            "{path}: {e}"
        );
    }
}

#[test]
fn shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/wsproxy.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.listeners(), ["127.0.0.1:8080".parse().unwrap()]);
    let names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["site", "chat"], "the shipped file shows two services");
}

/// The shipped file says it shows every option with its default value: every value its
/// top-level sections set is the default a file without it gets (as its service "site", which
/// overrides nothing, shows), apart from the upstreams (required) and the admin address (off by
/// default, on in the shipped file).
#[test]
fn shipped_config_sets_every_option_to_its_true_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/wsproxy.toml");
    let shipped = Config::load(&path).unwrap();
    let defaults = Config::parse(MINIMAL, "t").unwrap();
    let show = |c: &Config| {
        let admin = c
            .admin
            .as_ref()
            .map(|a| (a.idle_timeout, a.max_connections, a.token.is_some()));
        let s = c.service("site").unwrap_or(&c.services[0]);
        let u = &s.upstreams;
        [
            format!("listen {:?} {} {:?}", c.listeners(), c.max_connections, c.drain_timeout),
            format!("admin {admin:?}"),
            format!("{:?}", s.keepalive),
            format!("{:?}", s.access),
            format!("{:?}", s.limits),
            format!("{:?}", s.handshake),
            format!("{:?}", s.headers),
            format!(
                "upstreams {:?} {:?} {} {} {:?} {:?}",
                u.health, u.timeout, u.max_head_bytes, u.send_proxy_protocol, u.on_refusal, u.balance
            ),
            format!("{:?}", s.relay),
        ]
    };
    let default_admin = Config::parse(&format!("{MINIMAL}[admin]\naddress = \"127.0.0.1:9090\"\n"), "t").unwrap();
    let mut want = show(&defaults);
    want[1] = show(&default_admin)[1].clone();
    for (shipped, default) in show(&shipped).iter().zip(&want) {
        assert_eq!(
            shipped, default,
            "config/wsproxy.toml shows a value that is not the default"
        );
    }
}

#[test]
fn proxy_protocol_networks_and_timeout_are_checked_all_at_once() {
    let ok =
        format!("[listen.proxy_protocol]\ntrusted = [\"10.0.0.0/8\", \"192.0.2.1\", \"2001:db8::/32\"]\n{MINIMAL}");
    let pp = Config::parse(&ok, "t").unwrap().services[0]
        .proxy_protocol
        .clone()
        .unwrap();
    assert_eq!(pp.trusted.len(), 3);
    assert_eq!(pp.header_timeout, Duration::from_secs(5));
    assert!(
        Config::parse(MINIMAL, "t").unwrap().services[0]
            .proxy_protocol
            .is_none()
    );
    let bad = format!(
        "[listen.proxy_protocol]\ntrusted = [\"10.0.0.0/33\", \"nowhere\"]\nheader_timeout = \"0s\"\n{MINIMAL}"
    );
    let e = Config::parse(&bad, "t").unwrap_err();
    assert_eq!(e.problems.len(), 3, "{e}");
    assert!(
        e.problems.iter().all(|p| p.starts_with("listen.proxy_protocol.")),
        "{e}"
    );
    let headers = format!("[headers]\ntrusted_proxies = [\"10.1.2.3\", \"proxies\"]\n{MINIMAL}");
    let e = Config::parse(&headers, "t").unwrap_err();
    assert_eq!(e.problems.len(), 1, "{e}");
    assert!(e.problems[0].starts_with("headers.trusted_proxies: \"proxies\""), "{e}");
    let access = format!(
        "[access]\nallow = [\"10.0.0.0/8\"]\ndeny = [\"x\"]\norigins = [\"https://a.example\", \"a.example\"]\n{MINIMAL}"
    );
    let e = Config::parse(&access, "t").unwrap_err();
    assert_eq!(e.problems.len(), 2, "{e}");
    assert!(e.problems.iter().any(|p| p.starts_with("access.deny: \"x\"")), "{e}");
    assert!(
        e.problems
            .iter()
            .any(|p| p.starts_with("access.origins: \"a.example\"")),
        "{e}"
    );
    let empty = format!("[listen.proxy_protocol]\ntrusted = []\n{MINIMAL}");
    let e = Config::parse(&empty, "t").unwrap_err();
    assert!(
        e.problems[0].starts_with("listen.proxy_protocol.trusted: name the networks"),
        "{e}"
    );
}

#[test]
fn missing_file_is_one_clear_problem() {
    let e = Config::load(Path::new("/nonexistent/wsproxy.toml")).unwrap_err();
    assert_eq!(e.problems.len(), 1);
    assert!(e.problems[0].starts_with("cannot read the file"), "{e}");
}

/// Two services over shared defaults: each inherits what it does not set, key by key.
const TWO_SERVICES: &str = r#"
[limits]
burst = 5
max_connections_per_ip = 7
[upstreams]
timeout = "3s"
main = [{ address = "127.0.0.1:9001" }]
[[service]]
name = "chat"
listen = ["127.0.0.1:8080", "[::1]:8080"]
hosts = ["chat.example.com", "*.chat.example.com"]
[service.limits]
max_connections_per_ip = 2
[service.upstreams]
main = [{ address = "127.0.0.1:9101" }, { address = "127.0.0.1:9102", weight = 0 }]
[service.upstreams.health]
max_fails = 9
[[service]]
name = "feed"
listen = "127.0.0.1:8080"
"#;

#[test]
fn services_inherit_the_top_level_sections_key_by_key() {
    let c = Config::parse(TWO_SERVICES, "t").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.services.len(), 2);
    let (chat, feed) = (&c.services[0], &c.services[1]);
    assert_eq!(chat.name, "chat");
    assert_eq!(chat.listen.len(), 2);
    assert_eq!(
        chat.hosts,
        [
            HostPattern::Exact("chat.example.com".into()),
            HostPattern::Suffix("chat.example.com".into())
        ]
    );
    assert_eq!((chat.limits.burst, chat.limits.max_connections_per_ip), (5, 2));
    assert_eq!((feed.limits.burst, feed.limits.max_connections_per_ip), (5, 7));
    assert_eq!(chat.upstreams.main.len(), 2, "a list replaces the default's");
    assert_eq!(
        chat.upstreams.timeout,
        Duration::from_secs(3),
        "inherited next to the list"
    );
    assert_eq!(chat.upstreams.health.max_fails, 9);
    assert_eq!(chat.upstreams.health.fail_timeout, Duration::from_secs(10));
    assert_eq!(feed.upstreams.main[0].address, "127.0.0.1:9001".parse().unwrap());
    assert!(feed.hosts.is_empty());
    assert_eq!(c.listeners().len(), 2, "{:?}", c.listeners());
    assert_eq!(c.service("feed").unwrap().name, "feed");
}

#[test]
fn every_problem_of_every_service_is_reported_at_once_with_its_service_and_field() {
    let text = r#"
[listen]
address = "127.0.0.1:8080"
[limits]
burst = 0
[upstreams]
main = [{ address = "127.0.0.1:9001" }]
[[service]]
name = "a"
listen = ["127.0.0.1:8080"]
hosts = ["chat.example.com", "bad host"]
[service.limits]
requests_per_secnd = 3
[[service]]
name = "b"
listen = ["127.0.0.1:8080"]
hosts = ["CHAT.example.com"]
colour = "blue"
[service.upstreams]
main = []
[[service]]
name = "c"
listen = ["127.0.0.1:8080"]
[[service]]
name = "d"
listen = ["127.0.0.1:8080"]
[service.proxy_protocol]
trusted = ["10.0.0.0/8"]
[[service]]
name = "a"
listen = ["nowhere"]
[[service]]
listen = ["127.0.0.1:8081"]
"#;
    let e = Config::parse(text, "t").unwrap_err();
    let expected = [
        "listen.address: a file with [[service]] blocks",
        "limits.burst: must be at least 1",
        "service \"a\": hosts: \"bad host\" is not a host name",
        "service \"a\": limits: unknown field `requests_per_secnd`",
        "service \"b\": colour: unknown key",
        "service \"b\": upstreams.main: at least one upstream is needed",
        "service \"a\": listen: \"nowhere\" is not an IP address",
        "service[5]: name: every service needs one",
        "service \"d\": hosts: service \"c\" also takes every host on 127.0.0.1:8080",
        "service \"d\": proxy_protocol: differs from service \"b\"'s",
        "service \"a\": name: another service has the same name",
    ];
    for want in expected {
        assert!(
            e.problems.iter().any(|p| p.starts_with(want)),
            "no problem {want:?}:\n{e}"
        );
    }
    // `limits.burst` is a default every service inherits: reported once, not once per service.
    assert_eq!(
        e.problems.iter().filter(|p| p.contains("limits.burst")).count(),
        1,
        "{e}"
    );
    assert_eq!(e.problems.len(), expected.len(), "{e}");
}

#[test]
fn services_sharing_a_host_on_a_listener_are_refused_but_not_on_different_listeners() {
    let block = |name: &str, listen: &str, host: &str| {
        format!("[[service]]\nname = \"{name}\"\nlisten = [\"{listen}\"]\nhosts = [\"{host}\"]\n")
    };
    let same = format!(
        "{MINIMAL}{}{}",
        block("a", "127.0.0.1:8080", "x.example"),
        block("b", "127.0.0.1:8080", "X.example.")
    );
    let e = Config::parse(&same, "t").unwrap_err();
    assert_eq!(e.problems.len(), 1, "{e}");
    assert!(
        e.problems[0].starts_with("service \"b\": hosts: x.example on 127.0.0.1:8080 is service \"a\"'s already"),
        "{e}"
    );
    let apart = format!(
        "{MINIMAL}{}{}",
        block("a", "127.0.0.1:8080", "x.example"),
        block("b", "127.0.0.1:8081", "x.example")
    );
    assert!(Config::parse(&apart, "t").is_ok());
    // A wildcard and a name under it overlap on purpose: the most specific wins at run time.
    let nested = format!(
        "{MINIMAL}{}{}",
        block("a", "127.0.0.1:8080", "*.example"),
        block("b", "127.0.0.1:8080", "x.example")
    );
    assert!(Config::parse(&nested, "t").is_ok());
}

#[test]
fn a_file_without_services_is_one_service_named_default() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.services.len(), 1);
    assert_eq!(c.services[0].name, DEFAULT_SERVICE);
    assert!(c.services[0].hosts.is_empty());
    let e = Config::parse(&format!("colour = 1\n{MINIMAL}"), "t").unwrap_err();
    assert!(e.problems[0].starts_with("colour: unknown key"), "{e}");
}

/// A thousand services with ten upstreams each load in well under a second (the bench measures
/// it; this only guards against a quadratic step).
#[test]
fn a_thousand_services_load() {
    let mut text = String::from("[upstreams]\ntimeout = \"2s\"\n");
    for i in 0..1000 {
        let ups: Vec<String> = (0..10)
            .map(|u| format!("{{ address = \"10.{}.{}.{u}:9000\" }}", i / 250, i % 250))
            .collect();
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nlisten = [\"127.0.0.1:8080\"]\nhosts = [\"s{i}.example\"]\n\
             [service.upstreams]\nmain = [{}]\n",
            ups.join(", ")
        ));
    }
    let c = Config::parse(&text, "t").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.services.len(), 1000);
    assert_eq!(c.services.iter().map(|s| s.upstreams.main.len()).sum::<usize>(), 10_000);
}

#[test]
fn tls_files_are_read_matched_and_named_in_every_problem() {
    let ca = wsproxy_tests::tls_kit::TestCa::new("config");
    let (a, b) = (ca.issue("a", &["a.test"]), ca.issue("b", &["b.test"]));
    let block = |name: &str, listen: &str, cert: &std::path::Path, key: &std::path::Path, more: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = [\"{listen}\"]\nhosts = [\"{name}.test\"]\n\
             [service.tls]\ncertificate = \"{}\"\nkey = \"{}\"\n{more}",
            cert.display(),
            key.display()
        )
    };
    let good = format!(
        "{MINIMAL}{}{}",
        block(
            "a",
            "127.0.0.1:8443",
            &a.certificate,
            &a.key,
            "default_certificate = true\n"
        ),
        block("b", "127.0.0.1:8443", &b.certificate, &b.key, "min_version = \"1.3\"\n")
    );
    let c = Config::parse(&good, "t").unwrap_or_else(|e| panic!("{e}"));
    let tls = c.services[1].tls.as_ref().unwrap();
    assert_eq!(tls.min_version, TlsVersion::Tls13);
    assert!(tls.not_after > std::time::SystemTime::now());
    assert!(c.services[0].tls.as_ref().unwrap().default_certificate);

    let bad = format!(
        "{MINIMAL}{}{}{}[[service]]\nname = \"plain\"\nlisten = [\"127.0.0.1:8443\"]\nhosts = [\"p.test\"]\n",
        block(
            "a",
            "127.0.0.1:8443",
            &a.certificate,
            &b.key,
            "default_certificate = true\n"
        ),
        block(
            "b",
            "127.0.0.1:8443",
            &b.certificate,
            &b.key,
            "default_certificate = true\n"
        ),
        block(
            "c",
            "127.0.0.1:9443",
            std::path::Path::new("/nonexistent/c.pem"),
            &b.key,
            ""
        ),
    );
    let e = Config::parse(&bad, "t").unwrap_err();
    let expected = [
        format!(
            "service \"a\": tls.key: {} is not the key of the certificate in {}",
            b.key.display(),
            a.certificate.display()
        ),
        "service \"c\": tls.certificate: cannot read /nonexistent/c.pem".to_string(),
        "service \"plain\": tls: the listener 127.0.0.1:8443 is TLS for service \"b\"".to_string(),
    ];
    for want in &expected {
        assert!(
            e.problems.iter().any(|p| p.starts_with(want.as_str())),
            "no problem {want:?}:\n{e}"
        );
    }
    assert_eq!(e.problems.len(), expected.len(), "{e}");
    let two_defaults = format!(
        "{MINIMAL}{}{}",
        block(
            "a",
            "127.0.0.1:8443",
            &a.certificate,
            &a.key,
            "default_certificate = true\n"
        ),
        block(
            "b",
            "127.0.0.1:8443",
            &b.certificate,
            &b.key,
            "default_certificate = true\n"
        )
    );
    let e = Config::parse(&two_defaults, "t").unwrap_err();
    assert!(
        e.problems[0].starts_with("service \"b\": tls.default_certificate: service \"a\" has"),
        "{e}"
    );
}

#[test]
fn tls_cipher_suites_are_the_proxys_order_and_every_problem_is_named() {
    let ca = wsproxy_tests::tls_kit::TestCa::new("suites");
    let a = ca.issue("a", &["a.test"]);
    let text = |more: &str| format!("{MINIMAL}[tls]\n{}{more}", a.tls_lines());
    let c = Config::parse(
        &text("cipher_suites = [\"TLS_CHACHA20_POLY1305_SHA256\", \"tls_aes_128_gcm_sha256\", \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\n"),
        "t",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let tls = c.services[0].tls.as_ref().unwrap();
    let names: Vec<String> = tls
        .provider
        .cipher_suites
        .iter()
        .map(|s| format!("{:?}", s.suite()))
        .collect();
    assert_eq!(
        names,
        [
            "TLS13_CHACHA20_POLY1305_SHA256",
            "TLS13_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
        ]
    );
    assert!(tls.server_order);
    // Unset: every suite, the client's order.
    let c = Config::parse(&text(""), "t").unwrap_or_else(|e| panic!("{e}"));
    let tls = c.services[0].tls.as_ref().unwrap();
    assert!(!tls.server_order && tls.provider.cipher_suites.len() > 3);

    let e = Config::parse(
        &text("cipher_suites = [\"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\", \"TLS_RC4\", \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\n"),
        "t",
    )
    .unwrap_err()
    .to_string();
    for problem in [
        "tls.cipher_suites: unknown suite \"TLS_RC4\" (known: TLS_AES_256_GCM_SHA384",
        "tls.cipher_suites: \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\" is named twice",
        "tls.cipher_suites: names no TLS 1.3 suite (TLS 1.3 is always accepted)",
    ] {
        assert!(e.contains(problem), "{problem:?} not in:\n{e}");
    }
    let e = Config::parse(&text("cipher_suites = [\"TLS_AES_128_GCM_SHA256\"]\n"), "t")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("names no TLS 1.2 suite while tls.min_version = \"1.2\""),
        "{e}"
    );
    let ok = text("cipher_suites = [\"TLS_AES_128_GCM_SHA256\"]\nmin_version = \"1.3\"\n");
    assert!(Config::parse(&ok, "t").is_ok());
}
