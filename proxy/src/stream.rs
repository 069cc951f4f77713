//! The two ends of a connection as the handshake and the relay see them: plain TCP, or TLS
//! over TCP (a `wss` client, a TLS upstream). Bytes read before the stream's owner knew what it
//! was (past a PROXY protocol header) come first ([`Prefixed`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// `inner`, with `prefix` read before anything `inner` gives.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Prefixed { prefix, at: 0, inner }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The inner stream and the prefix bytes not read yet.
    pub fn into_parts(self) -> (T, Vec<u8>) {
        let mut prefix = self.prefix;
        prefix.drain(..self.at);
        (self.inner, prefix)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A TLS stream over TCP, either end.
pub type TlsStream = tokio_rustls::TlsStream<Prefixed<TcpStream>>;

/// One end of a proxied connection.
pub enum Stream {
    Plain(Prefixed<TcpStream>),
    Tls(Box<TlsStream>),
}

impl Stream {
    /// A plain stream with `early` bytes read before it.
    pub fn plain(tcp: TcpStream, early: Vec<u8>) -> Stream {
        Stream::Plain(Prefixed::new(early, tcp))
    }

    /// The TCP connection under it (socket options, addresses, descriptors).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(p) => p.get_ref(),
            Stream::Tls(t) => t.get_ref().0.get_ref(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The TCP connection of a plain stream and the early bytes it has not given yet; a TLS
    /// stream back as it is.
    pub fn into_tcp(self) -> Result<(TcpStream, Vec<u8>), Stream> {
        match self {
            Stream::Plain(p) => Ok(p.into_parts()),
            tls => Err(tls),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(p) => Pin::new(p).poll_read(cx, buf),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(p) => Pin::new(p).poll_write(cx, buf),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(p) => Pin::new(p).poll_flush(cx),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(p) => Pin::new(p).poll_shutdown(cx),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_prefix_comes_first_and_what_is_left_of_it_comes_back() {
        let (a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, b"-tail").await.unwrap();
        drop(b);
        let mut p = Prefixed::new(b"head".to_vec(), a);
        let mut two = [0u8; 2];
        p.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"he");
        let (_, left) = Prefixed::new(b"head".to_vec(), ()).into_parts();
        assert_eq!(left, b"head");
        let mut rest = Vec::new();
        p.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"ad-tail");
    }
}
