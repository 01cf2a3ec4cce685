//! Message framing: the 8-byte `kvmi_msg_hdr` and splitting a buffer into messages.
//!
//! Every message is `struct kvmi_msg_hdr { u16 id; u16 size; u32 seq; }` followed by `size`
//! bytes of payload, sent with one `sendmsg()`. A reply reuses the `id` and `seq` of the
//! message it answers. The header is the same in every wire profile; the largest message
//! differs ([`crate::wire::WireProfile::MAX_MSG_SIZE`]).

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::ProtocolError;

/// Size of the message header.
pub const HEADER_SIZE: usize = 8;

/// `struct kvmi_msg_hdr` as it is on the wire.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct MsgHdr {
    /// Message ID (command ID, or the event / event-reply ID).
    pub id: U16,
    /// Payload size in bytes.
    pub size: U16,
    /// Sequence number; replies reuse the request's.
    pub seq: U32,
}

const _: () = assert!(size_of::<MsgHdr>() == HEADER_SIZE);
const _: () = assert!(offset_of!(MsgHdr, id) == 0);
const _: () = assert!(offset_of!(MsgHdr, size) == 2);
const _: () = assert!(offset_of!(MsgHdr, seq) == 4);

/// A decoded message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Message ID.
    pub id: u16,
    /// Payload size in bytes.
    pub size: u16,
    /// Sequence number.
    pub seq: u32,
}

impl Header {
    /// Read the header at the start of `buf` (which may hold more).
    pub fn parse(buf: &[u8]) -> Result<Header, ProtocolError> {
        let (hdr, _) = MsgHdr::read_from_prefix(buf)
            .map_err(|_| ProtocolError::TruncatedHeader { got: buf.len() })?;
        Ok(Header {
            id: hdr.id.get(),
            size: hdr.size.get(),
            seq: hdr.seq.get(),
        })
    }

    /// Length of the whole message (header + payload).
    pub const fn message_len(&self) -> usize {
        HEADER_SIZE + self.size as usize
    }

    /// The wire form.
    pub fn to_wire(&self) -> MsgHdr {
        MsgHdr {
            id: U16::new(self.id),
            size: U16::new(self.size),
            seq: U32::new(self.seq),
        }
    }
}

/// One message: its header and its payload, borrowed from the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The header.
    pub header: Header,
    /// The `header.size` payload bytes.
    pub payload: &'a [u8],
}

/// Parse a buffer that holds exactly one message. A length that disagrees with the header's
/// `size`, or a message above `max_msg_size`, is `-KVM_EINVAL`.
pub fn parse_frame(buf: &[u8], max_msg_size: usize) -> Result<Frame<'_>, ProtocolError> {
    let header = Header::parse(buf)?;
    check_size(&header, max_msg_size)?;
    if buf.len() != header.message_len() {
        return Err(ProtocolError::SizeMismatch {
            what: "message",
            expected: header.message_len(),
            got: buf.len(),
        });
    }
    Ok(Frame {
        header,
        payload: buf.get(HEADER_SIZE..).unwrap_or(&[]),
    })
}

/// Take the first message off a stream buffer: `Ok(None)` if the buffer does not yet hold a
/// whole message, else the message and the bytes after it.
pub fn split_frame(
    buf: &[u8],
    max_msg_size: usize,
) -> Result<Option<(Frame<'_>, &[u8])>, ProtocolError> {
    let Ok(header) = Header::parse(buf) else {
        return Ok(None);
    };
    check_size(&header, max_msg_size)?;
    let Some(payload) = buf.get(HEADER_SIZE..header.message_len()) else {
        return Ok(None);
    };
    let rest = buf.get(header.message_len()..).unwrap_or(&[]);
    Ok(Some((Frame { header, payload }, rest)))
}

fn check_size(header: &Header, max_msg_size: usize) -> Result<(), ProtocolError> {
    if header.message_len() > max_msg_size {
        return Err(ProtocolError::SizeMismatch {
            what: "message above the maximum size",
            expected: max_msg_size,
            got: header.message_len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = HEADER_SIZE + 0xffff;

    #[test]
    fn parses_an_exact_frame() {
        let buf = [7, 0, 3, 0, 0x78, 0x56, 0x34, 0x12, 1, 2, 3];
        let frame = parse_frame(&buf, MAX).unwrap();
        assert_eq!(
            frame.header,
            Header {
                id: 7,
                size: 3,
                seq: 0x1234_5678
            }
        );
        assert_eq!(frame.payload, &[1, 2, 3]);
    }

    #[test]
    fn rejects_short_long_and_truncated_frames() {
        assert_eq!(
            parse_frame(&[1, 0, 0], MAX),
            Err(ProtocolError::TruncatedHeader { got: 3 })
        );
        let buf = [7, 0, 3, 0, 0, 0, 0, 0, 1, 2];
        assert_eq!(parse_frame(&buf, MAX).unwrap_err().code(), -22);
        let buf = [7, 0, 1, 0, 0, 0, 0, 0, 1, 2];
        assert!(matches!(
            parse_frame(&buf, MAX),
            Err(ProtocolError::SizeMismatch {
                expected: 9,
                got: 10,
                ..
            })
        ));
        let buf = [7, 0, 0xff, 0xff, 0, 0, 0, 0];
        assert!(parse_frame(&buf, 100).is_err());
    }

    #[test]
    fn splits_a_stream() {
        let buf = [1, 0, 1, 0, 9, 0, 0, 0, 0xaa, 2, 0, 0, 0, 10, 0, 0, 0, 3];
        let (first, rest) = split_frame(&buf, MAX).unwrap().unwrap();
        assert_eq!(first.header.id, 1);
        assert_eq!(first.header.seq, 9);
        assert_eq!(first.payload, &[0xaa]);
        let (second, rest) = split_frame(rest, MAX).unwrap().unwrap();
        assert_eq!((second.header.id, second.header.seq), (2, 10));
        assert!(second.payload.is_empty());
        assert_eq!(split_frame(rest, MAX), Ok(None));
        assert_eq!(split_frame(&buf[..8], MAX), Ok(None));
    }
}
