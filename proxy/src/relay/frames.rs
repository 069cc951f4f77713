//! WebSocket frame headers counted in a byte stream as it goes by, holding none of it: how many
//! messages the userspace relay carried, whatever its reads took at once (a relay that falls
//! behind reads several queued frames at a time).
//!
//! Only the promotion rule (`relay::promotion`) reads the count. The payload is never checked
//! (the proxy relays it untouched). A read inside a frame adds no message: it is part of the
//! frame counted at its header, so bulk sent in large frames stays bulk however small the reads
//! that carry it. A stream whose headers are not well-formed WebSocket (reserved bits no
//! extension uses, an undefined opcode, a fragmented or oversized control frame, a length with
//! its top bit set) counts each read as at least one message from then on: its headers mean
//! nothing, so it is judged by its reads.

/// Where one direction's stream stands: inside a header (its bytes so far) or a payload.
#[derive(Debug, Default, Clone, Copy)]
pub struct Frames {
    head: [u8; MAX_HEADER],
    have: usize,
    payload_left: u64,
    /// A header that RFC 6455 does not allow was seen: the stream is judged by its reads.
    not_websocket: bool,
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

/// Whether a complete header is one RFC 6455 allows (5.2, 5.5): RSV2 and RSV3 clear (RSV1 is
/// permessage-deflate's), a defined opcode, a control frame final with at most 125 bytes, a
/// 64-bit length with its most significant bit clear.
fn well_formed(head: &[u8]) -> bool {
    let (b0, b1) = (head[0], head[1]);
    let opcode = b0 & 0x0f;
    let len7 = b1 & 0x7f;
    let control_ok = opcode < 8 || (b0 & 0x80 != 0 && len7 <= 125);
    b0 & 0x30 == 0 && matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) && control_ok && (len7 != 127 || head[2] & 0x80 == 0)
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
    /// Follows `bytes` (one read); returns how many messages they count as: the frame headers
    /// they completed, and at least one once the stream showed it is not WebSocket.
    pub fn feed(&mut self, bytes: &[u8]) -> u64 {
        let headers = self.headers(bytes);
        if self.not_websocket { headers.max(1) } else { headers }
    }

    /// Follows `bytes`; returns how many frame headers they completed.
    fn headers(&mut self, mut bytes: &[u8]) -> u64 {
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
                let head = &self.head[..self.have];
                self.not_websocket |= !well_formed(head);
                self.payload_left = payload_len(head);
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
    fn any_bytes_are_followed_without_panic_and_counted_by_reads() {
        // Not WebSocket: every read counts, and nothing panics nor overflows.
        let mut f = Frames::default();
        let junk: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let counts: Vec<u64> = junk.chunks(333).map(|c| f.feed(c)).collect();
        assert!(counts.iter().skip(1).all(|&n| n >= 1), "{counts:?}");
        // A 64-bit length with its top bit set: not WebSocket, so the next read counts too.
        let mut f = Frames::default();
        assert_eq!(
            f.feed(&[0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
            1
        );
        assert_eq!(f.feed(&[0; 4096]), 1);
        // The largest length allowed: its payload's reads count nothing.
        let mut f = Frames::default();
        assert_eq!(f.feed(&[0x82, 127, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), 1);
        assert_eq!(f.feed(&[0; 4096]), 0);
    }

    #[test]
    fn bulk_in_large_frames_read_in_small_pieces_counts_its_frames() {
        let stream: Vec<u8> = (0..16).flat_map(|_| frame(64 * 1024, true)).collect();
        let mut f = Frames::default();
        let counts: Vec<u64> = stream.chunks(1448).map(|c| f.feed(c)).collect();
        assert_eq!(counts.iter().sum::<u64>(), 16);
        assert!(
            counts.iter().filter(|&&n| n == 0).count() > 700,
            "most reads are inside a frame"
        );
    }

    #[test]
    fn what_rfc_6455_does_not_allow_turns_to_counting_reads() {
        // Compressed (RSV1), continuation, close, ping and pong frames are well-formed.
        for b0 in [0xc1, 0x00, 0x88, 0x89, 0x8a] {
            let mut f = Frames::default();
            assert_eq!(f.feed(&[b0, 0x05, 1, 2]), 1);
            assert_eq!(f.feed(&[3]), 0, "{b0:#x}: inside the frame");
        }
        // RSV2, an undefined opcode, a fragmented control frame, a control frame of 126 bytes.
        let heads: [&[u8]; 4] = [&[0xa2, 0x05], &[0x83, 0x05], &[0x09, 0x05], &[0x89, 126, 0, 126]];
        for head in heads {
            let mut f = Frames::default();
            assert_eq!(f.feed(head), 1);
            assert_eq!(f.feed(&[3]), 1, "{head:x?}: judged by reads");
        }
    }
}
