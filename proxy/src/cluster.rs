//! Cluster limits: a client's handshake rate and open connections counted by every node of a
//! fleet together, in a Redis (or Valkey) server (`[cluster]`, [`config::Cluster`]).
//!
//! **One call per admission.** A Lua script ([`ADMIT_SCRIPT`], sent as EVALSHA, loaded on
//! NOSCRIPT) takes a GCRA token from the client's rate key and, under a connection cap, a lease
//! in the client's lease set, atomically and on the store's clock (`TIME`), so the nodes' clocks
//! do not matter. A client's keys share a hash tag, `PREFIX:{SERVICE:CLIENT}:rate` and
//! `...:leases`, so that Redis Cluster would keep them in one slot. The client is the node
//! limiter's key (an IPv4 address, an IPv6 prefix), and the node's limits come first: a client
//! over them is refused without a call.
//!
//! **Leases, not counters.** A lease is a member `NODE:ID` of the lease set, scored by its
//! expiry. The node renews all of its leases every third of `lease_ttl` (the store's `TIME`,
//! then one pipeline of ZADD and PEXPIRE per client), removes each when its connection ends (a
//! ZREM, batched; best effort) and simply stops renewing when it dies: its leases expire, and
//! stop counting, within `lease_ttl`. Nothing can leak: every count is a set of live leases.
//!
//! **Bounded cost.** Every call has a deadline: `cluster.timeout` (a few ms) for an admission,
//! a second for the background calls. A connection error, or [`TRIP_AFTER_TIMEOUTS`] timeouts in
//! a row with no answer for [`TRIP_AFTER_SILENCE`], marks the store down: handshakes then follow
//! `on_store_error` at once, without trying it, and a probe (PING) every [`PROBE_INTERVAL`] finds it again; the connection manager
//! reconnects by itself. Each change of state is logged once. A connection admitted without
//! the store (`allow`) still gets its lease, written by the next renewal: counts are right
//! again as soon as the store answers (after a restart that lost its data too).
//!
//! The client (a [`redis::aio::ConnectionManager`]: one multiplexed connection, reconnecting by
//! itself) and the leases are per service, kept across reloads in `service::State`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use crate::config::{self, OnStoreError};
use crate::limits::{ClientKey, Refusal};
use crate::lock::lock;
use crate::metrics::{ClusterMetrics, Metrics};

/// The admission: a GCRA rate check and, under a cap, a lease, in one atomic step.
///
/// KEYS[1]: the client's GCRA state (its theoretical arrival time, ms of the store's clock);
/// KEYS[2]: its leases (members NODE:ID scored by their expiry, ms). ARGV: the emission
/// interval (ms; 0: no shared rate), the tolerance ((burst - 1) intervals, ms), the connection
/// cap (0: none), the lease TTL (ms), the member. Answers {0, 0, held} admitted, {1, wait_ms, 0}
/// over the rate, {2, 0, held} at the cap. A refusal at the cap still spends the token, as the
/// node's own limiter does. Expired leases are removed when the set is full (below the cap
/// they do not matter, and the set's own expiry goes with its newest lease): most admissions
/// run four commands besides `TIME`.
pub const ADMIT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then tat = now end
  local wait = tat - now - tonumber(ARGV[2])
  if wait > 0 then
    return {1, math.ceil(wait), 0}
  end
  tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
end
local cap = tonumber(ARGV[3])
if cap == 0 then
  return {0, 0, 0}
end
local held = redis.call('ZCARD', KEYS[2])
if held >= cap then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  held = redis.call('ZCARD', KEYS[2])
  if held >= cap then
    return {2, 0, held}
  end
end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[5])
redis.call('PEXPIRE', KEYS[2], ttl)
return {0, 0, held + 1}
";

static ADMIT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ADMIT_SCRIPT));

/// Timeouts in a row that mark the store down, when it has not answered anything for
/// [`TRIP_AFTER_SILENCE`] either (a connection error marks it down at once). On a saturated
/// machine a scheduling hiccup makes many calls in flight late together while the store is
/// well: measured with the handshake benchmark, three in a row without the silence tripped
/// about once in ten seconds.
pub const TRIP_AFTER_TIMEOUTS: u32 = 3;
pub const TRIP_AFTER_SILENCE: Duration = Duration::from_millis(250);
/// How often a store marked down is tried again.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Deadline of the calls no handshake waits for (renewals, releases, probes).
const BACKGROUND_DEADLINE: Duration = Duration::from_secs(1);
/// Most releases sent in one pipeline, and most clients renewed in one.
const BATCH: usize = 1024;
/// Most releases kept while the store is down (to be sent when it is back).
const MAX_PENDING: usize = 65_536;
/// Releases wait this long for others to go with them: at thousands of connections ending a
/// second, one round trip to the store every few ms instead of one per connection. A lease
/// given back this much later is no matter for a cap.
const RELEASE_DELAY: Duration = Duration::from_millis(5);

/// Connection ids, unique in the process (a lease is `NODE:ID`).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// This process's name in lease members: host name, pid and a random part, so that a restarted
/// node (same host, maybe the same pid) never renews a dead one's leases.
static NODE: LazyLock<String> = LazyLock::new(|| {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
});

fn member(id: u64) -> String {
    format!("{}:{id}", *NODE)
}

/// The origin of the times kept in atomics.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn since_epoch() -> u64 {
    millis(EPOCH.elapsed())
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// A service's cluster limits at run time: the store client of its `[cluster]` URL, made at the
/// first admission that needs it and replaced when a reload changes the URL.
#[derive(Default)]
pub(crate) struct Cluster {
    store: ArcSwapOption<Store>,
    switching: Mutex<()>,
}

impl Cluster {
    /// The fleet's admission of a client this node admitted: with `limits.cluster` set, one
    /// call to the store, at most `cluster.timeout` long; the lease it takes (under a cap) is
    /// held with the node's slot for as long as the connection.
    pub async fn admit(
        &self,
        limits: &config::Limits,
        service: &str,
        ip: IpAddr,
        metrics: &Metrics,
    ) -> Result<Option<Lease>, Refusal> {
        let Some(cfg) = limits.cluster.as_deref() else {
            return Ok(None);
        };
        let store = self.store_for(cfg, service, metrics);
        store.admit(cfg, service, ClientKey::new(ip, limits.ipv6_prefix)).await
    }

    /// The lease of a connection a predecessor process admitted (its own lease expires with that
    /// process): taken without a call, written by the next renewal.
    pub fn adopt(&self, limits: &config::Limits, service: &str, ip: IpAddr, metrics: &Metrics) -> Option<Lease> {
        let cfg = limits.cluster.as_deref()?;
        let store = self.store_for(cfg, service, metrics);
        store.adopt(cfg, service, ClientKey::new(ip, limits.ipv6_prefix))
    }

    fn store_for(&self, cfg: &config::Cluster, service: &str, metrics: &Metrics) -> Arc<Store> {
        let current = |s: &Option<Arc<Store>>| s.as_ref().filter(|s| s.inner.url == cfg.url).map(Arc::clone);
        if let Some(s) = current(&self.store.load_full()) {
            return s;
        }
        let _switching = lock(&self.switching);
        if let Some(s) = current(&self.store.load_full()) {
            return s;
        }
        let s = Store::start(cfg, service, metrics.cluster());
        self.store.store(Some(Arc::clone(&s)));
        s
    }
}

/// The store as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Health {
    /// Answering.
    Up = 0,
    /// Reachable, but answering with errors (read-only, out of memory, a script error): each
    /// handshake still tries it, and follows `on_store_error` when it fails.
    Erring = 1,
    /// Not answering: handshakes do not try it until a probe succeeds.
    Down = 2,
}

/// One store client: its connection, this node's leases in it, and the task that renews and
/// releases them. Lives as long as its service uses the URL or a connection holds a lease.
pub(crate) struct Store {
    inner: Arc<Inner>,
    /// Stops the background task when the last holder goes.
    _stop: DropGuard,
}

struct Inner {
    /// As configured (compared on reload); `name` is what logs and metrics show.
    url: String,
    name: String,
    service: String,
    /// `None`: the client could not be made (never, with a validated URL); every call fails.
    manager: Option<ConnectionManager>,
    metrics: ClusterMetrics,
    /// This node's leases: connection id -> (lease set key, TTL).
    live: Mutex<HashMap<u64, (Arc<str>, Duration)>>,
    releases: mpsc::UnboundedSender<(Arc<str>, u64)>,
    /// Wakes the task to renew now (leases taken without the store, a store back up).
    renew_now: Notify,
    health: AtomicU8,
    timeouts: AtomicU32,
    /// When the store last answered, in ms since [`EPOCH`].
    answered: AtomicU64,
    /// The lease TTL in force (the last admission's), in ms: renewals come every third of it.
    ttl_ms: AtomicU64,
    /// `on_store_error = "deny"` in force (the last admission's), for the logs.
    deny: AtomicBool,
}

impl Store {
    fn start(cfg: &config::Cluster, service: &str, metrics: ClusterMetrics) -> Arc<Store> {
        let name = cfg.store_name();
        let manager = redis::Client::open(cfg.url.as_str())
            .and_then(|client| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(BACKGROUND_DEADLINE))
                    .set_response_timeout(Some(BACKGROUND_DEADLINE))
                    // One retry, quickly: the probes are the retries of a store that is down.
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(100));
                ConnectionManager::new_lazy_with_config(client, config)
            })
            .inspect_err(
                |e| warn!(service, store = %name, error = %e, "cluster store client not made; on_store_error applies"),
            )
            .ok();
        metrics.store_added(&name, service);
        let (releases, released) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            url: cfg.url.clone(),
            name,
            service: service.to_owned(),
            manager,
            metrics,
            live: Mutex::default(),
            releases,
            renew_now: Notify::new(),
            health: AtomicU8::new(Health::Up as u8),
            timeouts: AtomicU32::new(0),
            answered: AtomicU64::new(since_epoch()),
            ttl_ms: AtomicU64::new(millis(cfg.lease_ttl)),
            deny: AtomicBool::new(cfg.on_store_error == OnStoreError::Deny),
        });
        let stop = CancellationToken::new();
        tokio::spawn(background(Arc::clone(&inner), released, stop.clone()));
        Arc::new(Store {
            inner,
            _stop: stop.drop_guard(),
        })
    }

    /// One admission (see [`ADMIT_SCRIPT`]); `Ok(Some(lease))` under a connection cap.
    async fn admit(
        self: &Arc<Self>,
        cfg: &config::Cluster,
        service: &str,
        client: ClientKey,
    ) -> Result<Option<Lease>, Refusal> {
        let inner = &self.inner;
        inner.ttl_ms.store(millis(cfg.lease_ttl), Ordering::Relaxed);
        inner
            .deny
            .store(cfg.on_store_error == OnStoreError::Deny, Ordering::Relaxed);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let base = format!("{}:{{{service}:{client}}}", cfg.key_prefix);
        let leases: Arc<str> = format!("{base}:leases").into();
        let capped = cfg.max_connections_per_ip > 0;
        let mut tried = false;
        let answer = match &inner.manager {
            Some(m) if inner.health() != Health::Down => {
                let interval = if cfg.requests_per_second > 0.0 {
                    1000.0 / cfg.requests_per_second
                } else {
                    0.0
                };
                let mut invocation = ADMIT.prepare_invoke();
                invocation
                    .key(format!("{base}:rate"))
                    .key(&*leases)
                    .arg(interval)
                    .arg(interval * f64::from(cfg.burst.saturating_sub(1)))
                    .arg(cfg.max_connections_per_ip)
                    .arg(millis(cfg.lease_ttl))
                    .arg(member(id));
                let mut m = m.clone();
                let call = async move { invocation.invoke_async::<(i64, i64, i64)>(&mut m).await };
                tried = true;
                inner.call("admit", cfg.timeout, call).await.ok()
            }
            _ => {
                inner.metrics.error("admit", "down");
                None
            }
        };
        match answer {
            Some((0, _, _)) => Ok(capped.then(|| self.lease(id, leases, cfg.lease_ttl))),
            Some((1, wait_ms, _)) => {
                inner.metrics.refused(service, "rate");
                Err(Refusal::RateLimited {
                    retry_after: Duration::from_millis(wait_ms.max(1) as u64),
                })
            }
            Some(_) => {
                inner.metrics.refused(service, "connections");
                Err(Refusal::TooManyConnections)
            }
            None => match cfg.on_store_error {
                OnStoreError::Allow => {
                    inner.metrics.unchecked(service);
                    // Its lease is written by a renewal as soon as the store answers, so that
                    // the fleet counts this connection too.
                    let lease = capped.then(|| self.lease(id, leases, cfg.lease_ttl));
                    if capped {
                        inner.renew_now.notify_one();
                    }
                    Ok(lease)
                }
                OnStoreError::Deny => {
                    inner.metrics.refused(service, "store_error");
                    if capped && tried {
                        // A script that ran after the deadline took a lease nobody holds.
                        let _ = inner.releases.send((leases, id));
                    }
                    Err(Refusal::StoreUnavailable)
                }
            },
        }
    }

    /// A lease for a connection already open (handed over by a predecessor process), without a
    /// call: the next renewal writes it, so that the fleet counts the connection again.
    fn adopt(self: &Arc<Self>, cfg: &config::Cluster, service: &str, client: ClientKey) -> Option<Lease> {
        if cfg.max_connections_per_ip == 0 {
            return None;
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let leases: Arc<str> = format!("{}:{{{service}:{client}}}:leases", cfg.key_prefix).into();
        let lease = self.lease(id, leases, cfg.lease_ttl);
        self.inner.renew_now.notify_one();
        Some(lease)
    }

    fn lease(self: &Arc<Self>, id: u64, key: Arc<str>, ttl: Duration) -> Lease {
        lock(&self.inner.live).insert(id, (key, ttl));
        self.inner.metrics.leases(1);
        Lease {
            store: Arc::clone(self),
            id,
        }
    }
}

/// A connection's lease in the store, held with its slot (`connection::Admission`); dropping it gives it back (a ZREM,
/// batched, best effort: its expiry is the safety net).
pub(crate) struct Lease {
    store: Arc<Store>,
    id: u64,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({} in {})", member(self.id), self.store.inner.name)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let inner = &self.store.inner;
        let Some((key, _)) = lock(&inner.live).remove(&self.id) else {
            return;
        };
        inner.metrics.leases(-1);
        // The task is gone only with the store, which this lease holds.
        let _ = inner.releases.send((key, self.id));
    }
}

impl Inner {
    fn health(&self) -> Health {
        match self.health.load(Ordering::Acquire) {
            0 => Health::Up,
            1 => Health::Erring,
            _ => Health::Down,
        }
    }

    /// `f`, a call to the store, within `deadline`: counted, timed, and the store's health
    /// updated (each change logged once). `Err` when it failed or took too long.
    async fn call<T>(
        &self,
        op: &'static str,
        deadline: Duration,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ()> {
        let started = Instant::now();
        let result = tokio::time::timeout(deadline, f).await;
        self.metrics.call(op, started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(v)) => {
                self.timeouts.store(0, Ordering::Relaxed);
                self.answered.store(since_epoch(), Ordering::Relaxed);
                self.set_health(Health::Up, None);
                Ok(v)
            }
            Ok(Err(e)) => {
                let unreachable =
                    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout();
                let reason = if unreachable { "connection" } else { "response" };
                self.metrics.error(op, reason);
                let next = if unreachable { Health::Down } else { Health::Erring };
                // A probe's error answer (say, a password refused) leaves a store down as down.
                if next == Health::Down || self.health() != Health::Down {
                    self.set_health(next, Some(&e.to_string()));
                }
                Err(())
            }
            Err(_) => {
                self.metrics.error(op, "timeout");
                let silent = since_epoch().saturating_sub(self.answered.load(Ordering::Relaxed));
                if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TRIP_AFTER_TIMEOUTS
                    && silent >= millis(TRIP_AFTER_SILENCE)
                {
                    self.set_health(
                        Health::Down,
                        Some(&format!(
                            "no answer for {silent} ms; {TRIP_AFTER_TIMEOUTS} or more calls in a row took longer than their deadline"
                        )),
                    );
                }
                Err(())
            }
        }
    }

    fn set_health(&self, new: Health, error: Option<&str>) {
        let old = self.health.swap(new as u8, Ordering::AcqRel);
        if old == new as u8 {
            return;
        }
        self.metrics.store_up(&self.name, new != Health::Down);
        let (service, store) = (&self.service, &self.name);
        let on_store_error = if self.deny.load(Ordering::Relaxed) {
            OnStoreError::Deny
        } else {
            OnStoreError::Allow
        }
        .as_str();
        let error = error.unwrap_or("");
        match new {
            Health::Up => {
                self.timeouts.store(0, Ordering::Relaxed);
                info!(service, store, "cluster store answers again; cluster limits apply");
                self.renew_now.notify_one();
            }
            Health::Erring => {
                warn!(
                    service,
                    store,
                    error,
                    on_store_error,
                    "cluster store answers with errors; on_store_error applies to those handshakes"
                );
            }
            Health::Down => {
                warn!(
                    service,
                    store,
                    error,
                    on_store_error,
                    "cluster store unreachable; handshakes follow on_store_error until it answers"
                );
            }
        }
    }

    fn renew_period(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed) / 3).max(Duration::from_millis(100))
    }

    /// Writes every lease this node holds with a new expiry: the store's time, then one pipeline
    /// (of ZADD and PEXPIRE per client) per [`BATCH`] clients.
    async fn renew(&self) {
        let Some(m) = &self.manager else { return };
        let mut by_key: HashMap<Arc<str>, (Vec<u64>, Duration)> = HashMap::new();
        for (id, (key, ttl)) in lock(&self.live).iter() {
            let e = by_key.entry(Arc::clone(key)).or_default();
            e.0.push(*id);
            e.1 = e.1.max(*ttl);
        }
        if by_key.is_empty() {
            return;
        }
        let mut conn = m.clone();
        let time = async { redis::cmd("TIME").query_async::<(u64, u64)>(&mut conn).await };
        let Ok((secs, micros)) = self.call("renew", BACKGROUND_DEADLINE, time).await else {
            return;
        };
        let now_ms = secs as f64 * 1000.0 + micros as f64 / 1000.0;
        let clients: Vec<_> = by_key.into_iter().collect();
        for chunk in clients.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for (key, (ids, ttl)) in chunk {
                let ttl_ms = millis(*ttl);
                let zadd = pipe.cmd("ZADD").arg(&**key);
                for id in ids {
                    zadd.arg(now_ms + ttl_ms as f64).arg(member(*id));
                }
                zadd.ignore();
                pipe.cmd("PEXPIRE").arg(&**key).arg(ttl_ms).ignore();
            }
            let mut conn = m.clone();
            let sent = async move { pipe.exec_async(&mut conn).await };
            if self.call("renew", BACKGROUND_DEADLINE, sent).await.is_err() {
                return;
            }
        }
    }

    /// Removes the leases of connections that ended, [`BATCH`] per pipeline; those a failed
    /// call did not remove expire by themselves.
    async fn release(&self, pending: &mut Vec<(Arc<str>, u64)>) {
        let Some(m) = &self.manager else {
            pending.clear();
            return;
        };
        while !pending.is_empty() {
            let batch: Vec<_> = pending.drain(..pending.len().min(BATCH)).collect();
            let mut by_key: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
            for (key, id) in batch {
                by_key.entry(key).or_default().push(id);
            }
            let mut pipe = redis::pipe();
            for (key, ids) in &by_key {
                let zrem = pipe.cmd("ZREM").arg(&**key);
                for id in ids {
                    zrem.arg(member(*id));
                }
                zrem.ignore();
            }
            let mut conn = m.clone();
            let sent = async move { pipe.exec_async(&mut conn).await };
            if self.call("release", BACKGROUND_DEADLINE, sent).await.is_err() {
                pending.clear();
                return;
            }
        }
    }

    /// PING: true when the store answered.
    async fn probe(&self) -> bool {
        let Some(m) = &self.manager else { return false };
        let mut conn = m.clone();
        let ping = async move { redis::cmd("PING").query_async::<String>(&mut conn).await };
        self.call("probe", BACKGROUND_DEADLINE, ping).await.is_ok()
    }
}

/// The store client's own task: connects at once (so that the first handshake finds the
/// connection made), then renews every third of the lease TTL, sends releases as they come (in
/// batches; kept, up to [`MAX_PENDING`], while the store is down and sent when it is back), and
/// probes a store that is down.
async fn background(
    inner: Arc<Inner>,
    mut released: mpsc::UnboundedReceiver<(Arc<str>, u64)>,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => return,
        _ = inner.probe() => {}
    }
    // Deadlines kept across turns of the loop: a stream of releases must not keep putting off
    // a renewal or a probe.
    let mut renew_at = tokio::time::Instant::now() + inner.renew_period();
    let mut probe_at = tokio::time::Instant::now();
    let mut pending: Vec<(Arc<str>, u64)> = Vec::new();
    // When the oldest release waiting goes (`None`: none waits).
    let mut release_at: Option<tokio::time::Instant> = None;
    loop {
        let down = inner.health() == Health::Down;
        tokio::select! {
            () = stop.cancelled() => return,
            Some(first) = released.recv() => {
                pending.push(first);
                while pending.len() < MAX_PENDING
                    && let Ok(r) = released.try_recv()
                {
                    pending.push(r);
                }
                if pending.len() >= BATCH {
                    release_at = Some(tokio::time::Instant::now());
                }
                release_at.get_or_insert_with(|| tokio::time::Instant::now() + RELEASE_DELAY);
            }
            () = tokio::time::sleep_until(release_at.unwrap_or(renew_at)), if release_at.is_some() && !down => {
                release_at = None;
                inner.release(&mut pending).await;
            }
            () = tokio::time::sleep_until(renew_at) => {
                renew_at = tokio::time::Instant::now() + inner.renew_period();
                if !down {
                    inner.renew().await;
                    inner.release(&mut pending).await;
                }
            }
            // Leases taken without the store, or a store back up: its `set_health` asks for
            // this renewal, which writes the leases taken meanwhile (and those a store that
            // restarted without its data lost), then the releases kept meanwhile.
            () = inner.renew_now.notified(), if !down => {
                inner.renew().await;
                inner.release(&mut pending).await;
            }
            () = tokio::time::sleep_until(probe_at), if down => {
                inner.probe().await;
                probe_at = tokio::time::Instant::now() + PROBE_INTERVAL;
            }
        }
        if pending.len() > MAX_PENDING {
            // The oldest go: their leases expire by themselves.
            pending.drain(..pending.len() - MAX_PENDING);
        }
    }
}
