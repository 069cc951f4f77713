//! Where the verdict finds three kernel fields, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`): `struct sk_buff`'s `cb` (whose first two `u32`s are the TCP
//! sequence numbers, `struct tcp_skb_cb`), and `struct tcp_sock`'s `copied_seq` and
//! `write_seq`. Their offsets
//! change with the kernel's configuration and version, so they are looked up at load time and
//! handed to the verdict as read-only globals.
//!
//! Only what that needs of the BTF format (include/uapi/linux/btf.h) is read: the header, the
//! type records (to skip them by kind) and struct members, through anonymous structs and unions.

use anyhow::{Context as _, bail};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The offsets the verdict needs, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    pub skb_cb: u32,
    pub tcp_copied_seq: u32,
    pub tcp_write_seq: u32,
}

impl KernelLayout {
    /// Reads the offsets from the running kernel's BTF.
    pub fn of_running_kernel() -> anyhow::Result<Self> {
        let raw = std::fs::read(VMLINUX_BTF).with_context(|| format!("reading {VMLINUX_BTF}"))?;
        Self::from_btf(&raw)
    }

    /// Reads the offsets from a BTF blob; checks each field's size too (8 bytes of sequence
    /// numbers must fit in `cb`; the sequence numbers of `tcp_sock` are `u32`s).
    pub fn from_btf(raw: &[u8]) -> anyhow::Result<Self> {
        let btf = Btf::parse(raw)?;
        let (skb_cb, cb_size) = btf.member("sk_buff", "cb")?;
        if cb_size < 8 {
            bail!("sk_buff.cb is {cb_size} bytes, too small for TCP sequence numbers");
        }
        let seq = |name: &str| -> anyhow::Result<u32> {
            let (at, size) = btf.member("tcp_sock", name)?;
            if size != 4 {
                bail!("tcp_sock.{name} is {size} bytes, not 4");
            }
            if at == 0 {
                bail!("tcp_sock.{name} at offset 0 is not expected");
            }
            Ok(at)
        };
        if skb_cb == 0 {
            bail!("sk_buff.cb at offset 0 is not expected");
        }
        Ok(Self {
            skb_cb,
            tcp_copied_seq: seq("copied_seq")?,
            tcp_write_seq: seq("write_seq")?,
        })
    }
}

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
/// How deep anonymous members and typedef chains are followed (real kernels need 2-3).
const MAX_DEPTH: u32 = 16;

/// One type record: where its kind-specific data starts.
#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// Offset of the data after the 12-byte common part, in the type section.
    data: usize,
}

struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Type id N is `index[N - 1]`.
    index: Vec<Type>,
}

impl<'a> Btf<'a> {
    fn parse(raw: &'a [u8]) -> anyhow::Result<Self> {
        let u16_at = |o: usize| raw.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if u16_at(0) != Some(MAGIC) {
            bail!("not little-endian BTF (bad magic)");
        }
        let hdr = |i: usize| read_u32(raw, 4 + 4 * i).context("BTF header cut short");
        let (hdr_len, type_off, type_len, str_off, str_len) = (hdr(0)?, hdr(1)?, hdr(2)?, hdr(3)?, hdr(4)?);
        let section = |off: u32, len: u32| {
            let start = hdr_len as usize + off as usize;
            raw.get(start..start + len as usize)
                .context("BTF section out of bounds")
        };
        let (types, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
        let mut index = Vec::new();
        let mut at = 0;
        while at < types.len() {
            let word = |i: usize| read_u32(types, at + 4 * i).context("BTF type record cut short");
            let info = word(1)?;
            let t = Type {
                name_off: word(0)?,
                kind: (info >> 24) & 0x1f,
                vlen: info & 0xffff,
                kind_flag: info >> 31 == 1,
                size_or_type: word(2)?,
                data: at + 12,
            };
            at = t.data + extra_len(t.kind, t.vlen)?;
            index.push(t);
        }
        Ok(Self { types, strings, index })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn by_id(&self, id: u32) -> anyhow::Result<Type> {
        id.checked_sub(1)
            .and_then(|i| self.index.get(i as usize))
            .copied()
            .with_context(|| format!("BTF type id {id} out of range"))
    }

    /// Byte offset and size of `member` in `struct name`.
    fn member(&self, name: &str, member: &str) -> anyhow::Result<(u32, u32)> {
        let s = self
            .index
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name.as_bytes())
            .with_context(|| format!("struct {name} not in the kernel's BTF"))?;
        let (bits, ty) = self
            .find_member(*s, member.as_bytes(), 0)?
            .with_context(|| format!("struct {name} has no member {member}"))?;
        if bits % 8 != 0 {
            bail!("{name}.{member} is a bit field");
        }
        Ok((bits / 8, self.size_of(ty, 0)?))
    }

    /// Bit offset and type id of a member, looking into anonymous structs and unions.
    fn find_member(&self, t: Type, member: &[u8], depth: u32) -> anyhow::Result<Option<(u32, u32)>> {
        if depth > MAX_DEPTH {
            bail!("BTF nests too deep");
        }
        for i in 0..t.vlen as usize {
            let m = |w: usize| read_u32(self.types, t.data + 12 * i + 4 * w).context("BTF member cut short");
            let (name_off, ty, raw_off) = (m(0)?, m(1)?, m(2)?);
            // With kind_flag set, the top 8 bits are a bit field's size.
            let bits = if t.kind_flag { raw_off & 0x00ff_ffff } else { raw_off };
            if name_off == 0 {
                let inner = self.by_id(self.skip_qualifiers(ty, depth + 1)?)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some((b, found)) = self.find_member(inner, member, depth + 1)?
                {
                    return Ok(Some((bits + b, found)));
                }
            } else if self.name(name_off) == member {
                return Ok(Some((bits, ty)));
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn skip_qualifiers(&self, mut id: u32, depth: u32) -> anyhow::Result<u32> {
        for _ in depth..MAX_DEPTH {
            let t = self.by_id(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_type,
                _ => return Ok(id),
            }
        }
        bail!("BTF typedef chain too long")
    }

    /// Size in bytes of an int, array (of ints or arrays), struct or union.
    fn size_of(&self, id: u32, depth: u32) -> anyhow::Result<u32> {
        if depth > MAX_DEPTH {
            bail!("BTF nests too deep");
        }
        let t = self.by_id(self.skip_qualifiers(id, depth)?)?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION => Ok(t.size_or_type),
            KIND_ARRAY => {
                let elem = read_u32(self.types, t.data).context("BTF array cut short")?;
                let n = read_u32(self.types, t.data + 8).context("BTF array cut short")?;
                Ok(self.size_of(elem, depth + 1)?.saturating_mul(n))
            }
            k => bail!("BTF kind {k} has no size here"),
        }
    }
}

/// Bytes of kind-specific data after a type record's common 12 bytes.
fn extra_len(kind: u32, vlen: u32) -> anyhow::Result<usize> {
    let vlen = vlen as usize;
    Ok(match kind {
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0, // ptr, fwd, typedef, qualifiers, func, float, type tag
        1 | 14 | 17 => 4,                            // int, var, decl tag
        3 => 12,                                     // array
        4 | 5 | 15 | 19 => 12 * vlen,                // struct, union, datasec, enum64
        6 | 13 => 8 * vlen,                          // enum, func proto
        k => bail!("unknown BTF kind {k}"),
    })
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: `int` (4 bytes), `char[48]`, a struct with an anonymous union
    /// in front of `cb`, and `tcp_sock` with `copied_seq` and `write_seq` behind a typedef.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0char\0sk_buff\0cb\0tcp_sock\0copied_seq\0write_seq\0u32\0next\0".to_vec();
        let s = |name: &str| {
            let pat = format!("\0{name}\0");
            (strings.windows(pat.len()).position(|w| w == pat.as_bytes()).unwrap() + 1) as u32
        };
        let mut t: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: int, 4 bytes
        t.extend([s("int"), info(KIND_INT, 0), 4, 32]);
        // 2: char, 1 byte
        t.extend([s("char"), info(KIND_INT, 0), 1, 8]);
        // 3: char[48]
        t.extend([0, info(KIND_ARRAY, 0), 0, 2, 1, 48]);
        // 4: anonymous union { int next; }
        t.extend([0, info(KIND_UNION, 1), 8, s("next"), 1, 0]);
        // 5: struct sk_buff { union {..}; char cb[48] at byte 40 }
        t.extend([s("sk_buff"), info(KIND_STRUCT, 2), 88, 0, 4, 0, s("cb"), 3, 320]);
        // 6: typedef int u32
        t.extend([s("u32"), info(KIND_TYPEDEF, 0), 1]);
        // 7: struct tcp_sock { u32 copied_seq at byte 1464; u32 write_seq at byte 1600 }
        t.extend([
            s("tcp_sock"),
            info(KIND_STRUCT, 2),
            2304,
            s("copied_seq"),
            6,
            1464 * 8,
            s("write_seq"),
            6,
            1600 * 8,
        ]);
        let types: Vec<u8> = t.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut raw = Vec::new();
        raw.extend(MAGIC.to_le_bytes());
        raw.extend([1u8, 0]);
        for w in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            raw.extend(w.to_le_bytes());
        }
        raw.extend(types);
        raw.extend(strings);
        raw
    }

    #[test]
    fn offsets_are_found_through_anonymous_members_and_typedefs() {
        let layout = KernelLayout::from_btf(&blob()).unwrap();
        assert_eq!(
            layout,
            KernelLayout {
                skb_cb: 40,
                tcp_copied_seq: 1464,
                tcp_write_seq: 1600,
            }
        );
    }

    #[test]
    fn damaged_btf_is_an_error_not_a_panic() {
        let raw = blob();
        for cut in 0..raw.len() {
            let _ = KernelLayout::from_btf(&raw[..cut]);
        }
        let mut bad = raw.clone();
        bad[0] = 0;
        assert!(KernelLayout::from_btf(&bad).unwrap_err().to_string().contains("magic"));
        // A struct that lacks the member.
        let mut missing = raw.clone();
        let at = missing.windows(10).position(|w| w == b"copied_seq").unwrap();
        missing[at + 9] = b'x';
        let err = KernelLayout::from_btf(&missing).unwrap_err().to_string();
        assert!(err.contains("copied_seq"), "{err}");
    }

    #[test]
    fn the_running_kernel_has_every_field() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIPPED: {VMLINUX_BTF} is missing");
            return;
        }
        let layout = KernelLayout::of_running_kernel().unwrap();
        // Both lie inside their structs on every kernel built so far.
        assert!(
            layout.skb_cb < 256 && layout.tcp_copied_seq < 4096 && layout.tcp_write_seq < 4096,
            "{layout:?}"
        );
    }
}
