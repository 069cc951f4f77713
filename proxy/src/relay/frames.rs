//! WebSocket frame headers counted in a byte stream as it goes by, holding none of it: how many
//! messages the userspace relay carried, whatever its reads took at once (a relay that falls
//! behind reads several queued frames at a time).
//!
//! Only the promotion rule (`relay::promotion`) reads the count. The payload is never checked
//! (the proxy relays it untouched): a stream that is not well-formed WebSocket just counts
//! something else, and a read always counts as at least one message.

/// Where one direction's stream stands: inside a header (its bytes so far) or a payload.
#[derive(Debug, Default, Clone, Copy)]
pub struct Frames {
    head: [u8; MAX_HEADER],
    have: usize,
    payload_left: u64,
}

/// Two bytes, an extended length of up to 8, a masking key of 4 (RFC 6455, 5.2).
const MAX_HEADER: usize = 14;

/// The size of a header whose second byte is `b1`.
fn header_size(b1: u8) -> usize {
    let extended = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The payload length a complete header declares.
fn payload_len(head: &[u8]) -> u64 {
    match head[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        127 => u64::from_be_bytes(head[2..10].try_into().unwrap_or_default()),
        n => u64::from(n),
    }
}

impl Frames {
    /// Follows `bytes`; returns how many frame headers they completed.
    pub fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut headers = 0;
        loop {
            let skip = self.payload_left.min(bytes.len() as u64);
            self.payload_left -= skip;
            bytes = &bytes[skip as usize..];
            let Some((&b, rest)) = bytes.split_first() else {
                return headers;
            };
            bytes = rest;
            self.head[self.have] = b;
            self.have += 1;
            if self.have >= 2 && self.have == header_size(self.head[1]) {
                self.payload_left = payload_len(&self.head[..self.have]);
                self.have = 0;
                headers += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client sends it (masked) or a server (not), with `len` payload bytes.
    fn frame(len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let mask = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(mask | len as u8),
            126..=0xffff => {
                f.push(mask | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(mask | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0xab, len));
        f
    }

    #[test]
    fn counts_every_size_of_header_masked_or_not() {
        for masked in [false, true] {
            let stream: Vec<u8> = [0, 1, 125, 126, 65535, 65536, 200_000]
                .into_iter()
                .flat_map(|len| frame(len, masked))
                .collect();
            assert_eq!(Frames::default().feed(&stream), 7, "masked {masked}");
        }
    }

    #[test]
    fn headers_and_payloads_split_anywhere() {
        let stream: Vec<u8> = (0..50).flat_map(|i| frame(i * 37 % 300, i % 2 == 0)).collect();
        for chunk in [1, 2, 3, 7, 13, 64, 1000] {
            let mut f = Frames::default();
            let n: u64 = stream.chunks(chunk).map(|c| f.feed(c)).sum();
            assert_eq!(n, 50, "chunks of {chunk}");
            assert_eq!((f.have, f.payload_left), (0, 0), "ends between frames");
        }
    }

    #[test]
    fn several_queued_frames_in_one_read_count_each() {
        let read: Vec<u8> = (0..20).flat_map(|_| frame(64, false)).collect();
        assert_eq!(Frames::default().feed(&read), 20);
    }

    #[test]
    fn a_large_frame_counts_once_across_its_reads() {
        let stream = frame(1 << 20, false);
        let mut f = Frames::default();
        let counts: Vec<u64> = stream.chunks(64 * 1024).map(|c| f.feed(c)).collect();
        assert_eq!(counts.iter().sum::<u64>(), 1);
        assert_eq!(counts[0], 1);
    }

    #[test]
    fn any_bytes_are_followed_without_panic() {
        // Not WebSocket: whatever it counts, it never panics nor overflows.
        let mut f = Frames::default();
        let junk: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for c in junk.chunks(333) {
            f.feed(c);
        }
        let mut f = Frames::default();
        assert_eq!(
            f.feed(&[0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
            1
        );
        assert_eq!(f.feed(&[0; 4096]), 0);
    }
}
