//! The upstream every contender forwards to: a WebSocket server on one thread that handles frames
//! raw (`ws`), so that its own cost stays small beside the proxy's.
//!
//! - `/sink`: binary payload is counted and dropped; a text message `END` is answered with the
//!   number of payload bytes received since the last `END`, as text.
//! - `/group/N`: echo as below, and the connection joins broadcast group N. Text messages are
//!   commands: `B SIZE` makes the upstream send one SIZE-byte binary message, stamped with the
//!   time it was built, to every member of N (the frame is built once per round); `SINK` makes
//!   this connection count like `/sink` until the next `END`.
//! - any other path: every data frame is echoed as it came (fragments too), piece by piece as it
//!   arrives; pings are answered; a close is answered, then the connection is shut down.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::rc::Rc;

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::LocalSet;

use crate::ws::{self, Event, Frame, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, Out, Parser};

/// A reader stops reading while more than this waits to be written to its peer.
const QUEUE_LIMIT: usize = 4 << 20;
const READ_BUF: usize = 256 * 1024;

pub fn run(listen: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    LocalSet::new().block_on(&rt, serve(listen))
}

struct Conn {
    s: TcpStream,
    out: Out,
}

#[derive(Default)]
struct Groups {
    members: HashMap<u64, Vec<Rc<Conn>>>,
}

thread_local! {
    /// One read buffer for every connection: reads are handled whole before the next one.
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
    /// What one read's frames make the connection write, pushed in one piece.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

async fn serve(listen: SocketAddr) -> Result<()> {
    let socket = match listen {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen).with_context(|| format!("binding {listen}"))?;
    let listener: TcpListener = socket.listen(4096)?;
    let groups = Rc::new(RefCell::new(Groups::default()));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: wait a little instead of spinning.
                eprintln!("upstream: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let groups = groups.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = connection(stream, groups).await {
                eprintln!("upstream: connection failed: {e:#}");
            }
        });
    }
}

async fn connection(mut stream: TcpStream, groups: Rc<RefCell<Groups>>) -> Result<()> {
    stream.set_nodelay(true)?;
    let (path, mut early) = match ws::server_handshake(&mut stream).await {
        Ok(h) => h,
        // A peer that goes away mid-handshake (a proxy's health check, a closed benchmark
        // session) is no failure of the upstream's.
        Err(_) => return Ok(()),
    };
    let conn = Rc::new(Conn {
        s: stream,
        out: Out::default(),
    });
    let group = path.strip_prefix("/group/").and_then(|g| g.parse::<u64>().ok());
    if let Some(g) = group {
        groups.borrow_mut().members.entry(g).or_default().push(conn.clone());
    }
    let writer = {
        let c = conn.clone();
        tokio::task::spawn_local(async move { c.out.flush_forever(&c.s).await })
    };
    let mut h = Handler {
        conn: &conn,
        groups: &groups,
        group,
        sink: path == "/sink",
        path_sink: path == "/sink",
        parser: Parser::default(),
        first: 0,
        small: Vec::new(),
        count: 0,
        done: false,
    };
    let r = h.serve(&mut early).await;
    writer.abort();
    if let Some(g) = group {
        let mut gs = groups.borrow_mut();
        if let Some(ms) = gs.members.get_mut(&g) {
            ms.retain(|m| !Rc::ptr_eq(m, &conn));
            if ms.is_empty() {
                gs.members.remove(&g);
            }
        }
    }
    r
}

fn is_data(op: u8) -> bool {
    op == OP_BINARY || op == OP_CONT
}

struct Handler<'a> {
    conn: &'a Rc<Conn>,
    groups: &'a Rc<RefCell<Groups>>,
    group: Option<u64>,
    /// Counting, not echoing: on `/sink`, or on a group connection between `SINK` and `END`.
    sink: bool,
    path_sink: bool,
    parser: Parser,
    /// First byte (FIN, opcode) of the frame being read.
    first: u8,
    /// Payload of a control or text frame (at most 125 bytes kept).
    small: Vec<u8>,
    /// Sink: payload bytes since the last `END`.
    count: u64,
    /// A close was answered: stop reading.
    done: bool,
}

impl Handler<'_> {
    async fn serve(&mut self, early: &mut [u8]) -> Result<()> {
        self.handle(early)?;
        while !self.done {
            self.conn.out.below(QUEUE_LIMIT).await;
            if self.conn.out.broken() {
                return Ok(());
            }
            if self.conn.s.readable().await.is_err() {
                return Ok(());
            }
            let eof = BUF.with(|b| -> Result<bool> {
                let mut b = b.borrow_mut();
                match self.conn.s.try_read(&mut b) {
                    Ok(0) => Ok(true),
                    Ok(n) => self.handle(&mut b[..n]).map(|()| false),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
                    Err(_) => Ok(true),
                }
            })?;
            if eof {
                return Ok(());
            }
        }
        // The close was answered: let it leave, then FIN.
        self.conn.out.below(0).await;
        // SAFETY: a valid socket of ours.
        unsafe { libc::shutdown(self.conn.s.as_raw_fd(), libc::SHUT_WR) };
        Ok(())
    }

    /// Handles the frames of one read; what they make the connection write goes out in one push.
    fn handle(&mut self, data: &mut [u8]) -> Result<()> {
        SCRATCH.with(|out| {
            let mut out = out.borrow_mut();
            out.clear();
            let mut rounds = Vec::new();
            let mut sink = self.sink;
            let path_sink = self.path_sink;
            // On a broadcast group's connections and on `/sink` text messages are commands, not
            // echoed.
            let echo_text = !sink && self.group.is_none();
            let (parser, first, small, count, done) = (
                &mut self.parser,
                &mut self.first,
                &mut self.small,
                &mut self.count,
                &mut self.done,
            );
            parser.feed(data, &mut |e| match e {
                Event::Start { first: f, len } => {
                    *first = f;
                    small.clear();
                    let op = Event::opcode(f);
                    if !sink && (is_data(op) || (op == OP_TEXT && echo_text)) {
                        ws::put_header(&mut out, f, len as usize, false);
                    }
                }
                Event::Payload(p) => {
                    let op = Event::opcode(*first);
                    if sink && is_data(op) {
                        *count += p.len() as u64;
                    } else if !sink && (is_data(op) || (op == OP_TEXT && echo_text)) {
                        out.extend_from_slice(p);
                    }
                    if !is_data(op) && small.len() < 125 {
                        small.extend_from_slice(&p[..p.len().min(125 - small.len())]);
                    }
                }
                Event::End => match Event::opcode(*first) {
                    OP_TEXT if echo_text => {}
                    OP_TEXT if small.as_slice() == b"SINK" => sink = true,
                    OP_TEXT if small.as_slice() == b"END" => {
                        out.extend_from_slice(Frame::new(OP_TEXT, count.to_string().as_bytes(), false).bytes());
                        *count = 0;
                        sink = path_sink;
                    }
                    OP_TEXT => {
                        if let Some(size) = small
                            .strip_prefix(b"B ")
                            .and_then(|s| std::str::from_utf8(s).ok())
                            .and_then(|s| s.trim().parse::<usize>().ok())
                        {
                            rounds.push(size);
                        }
                    }
                    OP_PING => out.extend_from_slice(Frame::new(OP_PONG, small, false).bytes()),
                    OP_CLOSE => {
                        out.extend_from_slice(Frame::new(OP_CLOSE, small, false).bytes());
                        *done = true;
                    }
                    _ => {}
                },
            })?;
            self.sink = sink;
            if !out.is_empty() {
                self.conn.out.push(&self.conn.s, &out);
            }
            for size in rounds {
                self.broadcast(size);
            }
            Ok(())
        })
    }

    fn broadcast(&self, size: usize) {
        let Some(g) = self.group else { return };
        let mut frame = Frame::binary(size.clamp(8, 1 << 20), false);
        let bytes = frame.stamp(ws::now_ns());
        let groups = self.groups.borrow();
        for m in groups.members.get(&g).into_iter().flatten() {
            m.out.push(&m.s, bytes);
        }
    }
}
