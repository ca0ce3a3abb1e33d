//! What more than one fuzz target needs.

use std::sync::OnceLock;

/// One tokio runtime for a target's whole run (current thread; blocking
/// work goes to its pool).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Record bodies taken from `data` (a 2-byte big-endian length before each,
/// cut to what is left) and framed as the project's files frame records: a
/// u32 length (little end), the CRC-32, the body. Mutations then reach the
/// bodies instead of failing the checksum.
pub fn framed_records(data: &[u8], out: &mut Vec<u8>) {
    let mut rest = data;
    while rest.len() >= 2 {
        let len = (usize::from(rest[0]) << 8 | usize::from(rest[1])).min(rest.len() - 2);
        let body = &rest[2..2 + len];
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        out.extend_from_slice(body);
        rest = &rest[2 + len..];
    }
}
