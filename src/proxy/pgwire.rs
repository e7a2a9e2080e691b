//! Just enough of the PostgreSQL wire protocol for a proxy that does not terminate it:
//!
//! - the client's first packet (`read_first`): `SSLRequest`, `GSSENCRequest`, `CancelRequest`,
//!   a `StartupMessage`, or the first record of a direct TLS handshake (PostgreSQL 17's
//!   `sslnegotiation=direct`), read in one `recv` of `FIRST_READ` bytes when it fits. Its length
//!   is checked before anything more is allocated: a packet is at most `MAX_STARTUP_LEN` bytes
//!   (PostgreSQL's own cap), a TLS record at most `MAX_TLS_RECORD`, so a hostile length field
//!   costs nothing;
//! - the session's `BackendKeyData` (`KeyScanner`), a pure scanner fed the server's first
//!   bytes, which stops at the key, at `ReadyForQuery`/`ErrorResponse`, at an encrypted answer
//!   (`S`/`G` to an encryption request: the key is then unseen), or after `MAX_SCAN` bytes;
//! - refusing a client the way a server would (`refuse`): `N` to encryption requests, then an
//!   `ErrorResponse`.
//!
//! Nothing else is parsed: once a session is placed its bytes pass untouched.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const SSL_REQUEST: u32 = 80877103;
pub const GSSENC_REQUEST: u32 = 80877104;
pub const CANCEL_REQUEST: u32 = 80877102;
/// Protocol 3.0's version code in a StartupMessage.
pub const PROTOCOL_3: u32 = 3 << 16;
/// Startup packets are small; PostgreSQL itself caps them at 10000 bytes.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Longest secret key of a `BackendKeyData`/`CancelRequest`: 4 bytes in protocol 3.0, up to
/// 256 in protocol 3.2 (PostgreSQL 18 sends 32).
pub const MAX_SECRET_LEN: usize = 256;
/// Largest TLS record (2^14 bytes of plaintext plus the expansion TLS allows).
pub const MAX_TLS_RECORD: usize = 5 + (1 << 14) + 2048;
/// Server bytes the key scanner reads before it gives up (authentication exchanges and
/// parameter statuses are far smaller).
pub const MAX_SCAN: usize = 64 * 1024;

/// SQLSTATEs pgfront answers with.
pub mod sqlstate {
    /// cannot_connect_now: the same code PostgreSQL uses while starting up or in recovery.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// too_many_connections
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// admin_shutdown
    pub const ADMIN_SHUTDOWN: &str = "57P01";
}

/// What a client's first packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SslRequest,
    GssEncRequest,
    Cancel,
    /// A StartupMessage with its protocol version.
    Startup {
        version: u32,
    },
    /// A TLS handshake record: the client starts TLS without asking (PostgreSQL 17+).
    DirectTls,
    /// Not PostgreSQL, or a length out of bounds: closed without an answer.
    Invalid,
}

/// A client's first packet, whole (length word included), as it is to be forwarded (after a
/// startup or a TLS record, with what followed it: see `read_first`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstPacket {
    pub kind: Kind,
    /// Empty for `Kind::Invalid`.
    pub bytes: Vec<u8>,
}

impl FirstPacket {
    /// The process id and secret key a `CancelRequest` names (the bytes after its code), the
    /// same bytes as the `BackendKeyData` body that `KeyScanner` reads.
    pub fn cancel_key(&self) -> Option<&[u8]> {
        (self.kind == Kind::Cancel).then(|| &self.bytes[8..])
    }
}

/// Classifies a first packet from its first 8 bytes: its kind and whole length, bounded.
pub fn classify(header: [u8; 8]) -> (Kind, usize) {
    if header[0] == 0x16 && header[1] == 0x03 {
        // TLS record: type 22 (handshake), version 3.x, 16-bit length.
        let len = 5 + u16::from_be_bytes([header[3], header[4]]) as usize;
        return if (8..=MAX_TLS_RECORD).contains(&len) { (Kind::DirectTls, len) } else { (Kind::Invalid, 0) };
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let code = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let kind = match code {
        SSL_REQUEST if len == 8 => Kind::SslRequest,
        GSSENC_REQUEST if len == 8 => Kind::GssEncRequest,
        CANCEL_REQUEST if (16..=12 + MAX_SECRET_LEN).contains(&len) => Kind::Cancel,
        // Protocol 2 and 3 (the special requests above are major 1234): the server answers
        // versions it does not speak itself.
        v if (2..=3).contains(&(v >> 16)) && (8..=MAX_STARTUP_LEN).contains(&len) => Kind::Startup { version: v },
        _ => Kind::Invalid,
    };
    if kind == Kind::Invalid {
        (kind, 0)
    } else {
        (kind, len)
    }
}

/// Bytes the first read asks for: a usual client's whole startup packet, in one `recv`.
const FIRST_READ: usize = 512;

/// Reads a client's first packet: in one read when it is at most `FIRST_READ` bytes, more only
/// after its length was checked (at most `MAX_TLS_RECORD` bytes); an invalid header is not read
/// further. A client waits for the answer to its first packet, so nothing should follow it.
/// What does (a client that does not wait) is kept after a startup or a TLS record, to be
/// forwarded with it in order, dropped after a cancel (the server closes a cancel connection),
/// and makes an encryption request invalid, as PostgreSQL rejects "unencrypted data after SSL
/// request".
pub async fn read_first<R: AsyncRead + Unpin>(mut r: R) -> std::io::Result<FirstPacket> {
    let mut bytes = Vec::with_capacity(FIRST_READ);
    fill(&mut r, &mut bytes, 8).await?;
    let (kind, len) = classify(bytes[..8].try_into().expect("8 bytes"));
    if kind == Kind::Invalid {
        return Ok(FirstPacket { kind, bytes: Vec::new() });
    }
    bytes.reserve_exact(len.saturating_sub(bytes.len()));
    fill(&mut r, &mut bytes, len).await?;
    match kind {
        Kind::Cancel => bytes.truncate(len),
        Kind::SslRequest | Kind::GssEncRequest if bytes.len() > len => {
            return Ok(FirstPacket { kind: Kind::Invalid, bytes: Vec::new() })
        }
        _ => {}
    }
    Ok(FirstPacket { kind, bytes })
}

/// Reads into `bytes`' spare capacity until it holds at least `n` bytes; the end of the stream
/// first is an error.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, bytes: &mut Vec<u8>, n: usize) -> std::io::Result<()> {
    while bytes.len() < n {
        if r.read_buf(bytes).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// An `ErrorResponse` message with severity FATAL.
pub fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + message.len());
    for (tag, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        body.push(tag);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Refuses a client whose first packet was of kind `first`, as PostgreSQL would, within
/// `limit`: encryption requests get `N` (pgfront does not terminate TLS; a client that requires
/// it gets a clear refusal from libpq itself), a startup gets the `ErrorResponse`, anything
/// else is closed. Best effort: a client that does not speak in time is simply closed.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    first: Kind,
    code: &str,
    message: &str,
    limit: Duration,
) {
    let _ = tokio::time::timeout(limit, async {
        let mut kind = first;
        // At most a GSSENCRequest, then an SSLRequest, then the startup.
        for _ in 0..3 {
            match kind {
                Kind::SslRequest | Kind::GssEncRequest => {
                    s.write_all(b"N").await?;
                    kind = read_first(&mut *s).await?.kind;
                }
                Kind::Startup { .. } => {
                    s.write_all(&error_response(code, message)).await?;
                    s.flush().await?;
                    break;
                }
                Kind::Cancel | Kind::DirectTls | Kind::Invalid => break,
            }
        }
        s.shutdown().await
    })
    .await;
}

/// Bytes of a key kept inline: the process id and a secret of up to 32 bytes (protocol 3.0's 4,
/// PostgreSQL 18's 32). Longer secrets, which the protocol allows, go to the heap.
const INLINE_KEY: usize = 4 + 32;

/// A session's process id and secret key, as `BackendKeyData` carries it and `CancelRequest`
/// repeats it. Compared, hashed and borrowed as its bytes, so a map keyed by it is looked up
/// with the `&[u8]` of a cancel request.
#[derive(Clone)]
pub enum CancelKey {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Arc<[u8]>),
}

impl CancelKey {
    pub fn from_bytes(b: &[u8]) -> CancelKey {
        if b.len() <= INLINE_KEY {
            let mut bytes = [0u8; INLINE_KEY];
            bytes[..b.len()].copy_from_slice(b);
            CancelKey::Inline { len: b.len() as u8, bytes }
        } else {
            CancelKey::Heap(Arc::from(b))
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CancelKey::Inline { len, bytes } => &bytes[..*len as usize],
            CancelKey::Heap(b) => b,
        }
    }
}

impl PartialEq for CancelKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for CancelKey {}
impl Hash for CancelKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}
impl Borrow<[u8]> for CancelKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl std::fmt::Debug for CancelKey {
    /// The secret stays out of logs: only the process id is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.as_bytes();
        let pid = b.get(..4).map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
        write!(f, "CancelKey {{ pid: {pid:?}, secret: {} bytes }}", b.len().saturating_sub(4))
    }
}

/// What the key scanner concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scanned {
    /// Feed it more server bytes.
    More,
    Key(CancelKey),
    /// No key will be seen; the scanner is done.
    NoKey(NoKey),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoKey {
    /// The server accepted TLS or GSS encryption (`S`/`G`), or the client started TLS directly.
    Encrypted,
    /// `ReadyForQuery` or `ErrorResponse` came first (no key sent, or the startup failed).
    NotSent,
    /// Not the PostgreSQL protocol as expected, or more than `MAX_SCAN` bytes without a key.
    GaveUp,
    /// The client's first packet opens no session (a cancel request, garbage).
    NoSession,
}

/// Reads a session's `BackendKeyData` out of the server's first bytes, in whatever chunks
/// they arrive, without buffering them: a few dozen bytes of state.
#[derive(Debug, Clone)]
pub struct KeyScanner {
    state: ScanState,
    /// Bytes consumed; never much above `MAX_SCAN`, so 32 bits (the scanner lives as long as
    /// its session: kept small).
    seen: u32,
}

#[derive(Debug, Clone)]
enum ScanState {
    /// Single-byte answers to encryption requests: `N` (another request or the startup
    /// follows), `S`/`G` (encrypted from here on).
    Negotiating,
    /// A message header: type byte and length word.
    Header {
        buf: [u8; 5],
        have: u8,
    },
    Skip {
        left: u32,
    },
    Key {
        buf: KeyBuf,
        have: u16,
        want: u16,
    },
    Done(NoKey),
}

#[derive(Debug, Clone)]
enum KeyBuf {
    Inline([u8; INLINE_KEY]),
    Heap(Vec<u8>),
}

impl KeyBuf {
    fn with_len(n: usize) -> KeyBuf {
        if n <= INLINE_KEY {
            KeyBuf::Inline([0; INLINE_KEY])
        } else {
            KeyBuf::Heap(vec![0; n])
        }
    }
    fn slice(&mut self, n: usize) -> &mut [u8] {
        match self {
            KeyBuf::Inline(b) => &mut b[..n],
            KeyBuf::Heap(v) => &mut v[..n],
        }
    }
}

impl KeyScanner {
    /// A scanner for a session whose client opened with `first`.
    pub fn new(first: Kind) -> KeyScanner {
        let state = match first {
            Kind::SslRequest | Kind::GssEncRequest => ScanState::Negotiating,
            Kind::Startup { .. } => ScanState::Header { buf: [0; 5], have: 0 },
            Kind::DirectTls => ScanState::Done(NoKey::Encrypted),
            Kind::Cancel | Kind::Invalid => ScanState::Done(NoKey::NoSession),
        };
        KeyScanner { state, seen: 0 }
    }

    /// Consumes the next server bytes. Once it answered something else than `More` it keeps
    /// answering `NoKey` (a key is reported once).
    pub fn feed(&mut self, mut data: &[u8]) -> Scanned {
        while !data.is_empty() {
            if self.seen as usize >= MAX_SCAN {
                return self.finish(NoKey::GaveUp);
            }
            let n = match &mut self.state {
                ScanState::Done(why) => return Scanned::NoKey(*why),
                ScanState::Negotiating => {
                    match data[0] {
                        b'N' => {}
                        b'S' | b'G' => return self.finish(NoKey::Encrypted),
                        t => self.state = ScanState::Header { buf: [t, 0, 0, 0, 0], have: 1 },
                    }
                    1
                }
                ScanState::Header { buf, have } => {
                    let n = (5 - *have as usize).min(data.len());
                    buf[*have as usize..*have as usize + n].copy_from_slice(&data[..n]);
                    *have += n as u8;
                    if *have == 5 {
                        let (t, len) = (buf[0], u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize);
                        self.seen += n as u32;
                        data = &data[n..];
                        if let Some(done) = self.header(t, len) {
                            return done;
                        }
                        continue;
                    }
                    n
                }
                ScanState::Skip { left } => {
                    let n = (*left as usize).min(data.len());
                    *left -= n as u32;
                    if *left == 0 {
                        self.state = ScanState::Header { buf: [0; 5], have: 0 };
                    }
                    n
                }
                ScanState::Key { buf, have, want } => {
                    let (h, w) = (*have as usize, *want as usize);
                    let n = (w - h).min(data.len());
                    buf.slice(w)[h..h + n].copy_from_slice(&data[..n]);
                    *have += n as u16;
                    if *have == *want {
                        let key = match std::mem::replace(buf, KeyBuf::Inline([0; INLINE_KEY])) {
                            KeyBuf::Inline(b) => CancelKey::Inline { len: *want as u8, bytes: b },
                            KeyBuf::Heap(v) => CancelKey::Heap(Arc::from(v)),
                        };
                        self.state = ScanState::Done(NoKey::NotSent);
                        return Scanned::Key(key);
                    }
                    n
                }
            };
            self.seen += n as u32;
            data = &data[n..];
        }
        match self.state {
            ScanState::Done(why) => Scanned::NoKey(why),
            _ if self.seen as usize >= MAX_SCAN => self.finish(NoKey::GaveUp),
            _ => Scanned::More,
        }
    }

    /// A complete message header: decides what follows.
    fn header(&mut self, t: u8, len: usize) -> Option<Scanned> {
        if len < 4 {
            return Some(self.finish(NoKey::GaveUp));
        }
        let body = len - 4;
        match t {
            b'K' if (4 + 4..=4 + MAX_SECRET_LEN).contains(&body) => {
                self.state = ScanState::Key { buf: KeyBuf::with_len(body), have: 0, want: body as u16 };
                None
            }
            b'K' => Some(self.finish(NoKey::GaveUp)),
            b'Z' | b'E' => Some(self.finish(NoKey::NotSent)),
            _ if self.seen as usize + body > MAX_SCAN => Some(self.finish(NoKey::GaveUp)),
            _ => {
                self.state = if body == 0 {
                    ScanState::Header { buf: [0; 5], have: 0 }
                } else {
                    ScanState::Skip { left: body as u32 }
                };
                None
            }
        }
    }

    fn finish(&mut self, why: NoKey) -> Scanned {
        self.state = ScanState::Done(why);
        Scanned::NoKey(why)
    }
}

/// Largest answer to a `StartupMessage` read before the session is handed to the client (a
/// trust login's `AuthenticationOk`, parameter statuses, key and `ReadyForQuery` take under
/// 1 KiB; an answer that needs more is handed over as far as it got).
pub const MAX_STARTUP_ANSWER: usize = 16 * 1024;

/// How far a server's answer to a `StartupMessage` has got, judged from its bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupAnswer<'a> {
    /// Only `AuthenticationOk`, parameter statuses, the key, notices so far (or a message cut
    /// short): the client has nothing to say yet, so more is read.
    Incomplete,
    /// `ReadyForQuery` (served), an authentication request (the client must answer), a final
    /// error of any other kind, or a message this reader does not follow: the bytes go to the
    /// client and the session is piped from here.
    Handover,
    /// An `ErrorResponse` meaning the server is stopping, crashed or not ready (`57P01`
    /// admin_shutdown, `57P02` crash_shutdown, `57P03` cannot_connect_now) before the session
    /// was served: nothing the client cannot replay happened, so another server may serve it.
    NotServed { code: &'a str, message: &'a str },
}

/// Whether `code` says the server ended or refused a session because it is stopping, crashed
/// or not yet ready, rather than because of the session itself.
pub fn server_unavailable(code: &str) -> bool {
    matches!(code, "57P01" | "57P02" | "57P03")
}

/// Walks the messages of a server's answer to a `StartupMessage` (pure: `buf` is everything
/// read so far).
pub fn startup_answer(buf: &[u8]) -> StartupAnswer<'_> {
    let cut_short = if buf.len() >= MAX_STARTUP_ANSWER { StartupAnswer::Handover } else { StartupAnswer::Incomplete };
    let mut rest = buf;
    loop {
        let [kind, a, b, c, d, ..] = *rest else { return cut_short };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        // A message this reader does not follow is handed over as soon as its header shows it
        // (a server that is not PostgreSQL, e.g. a TCP echo, is piped as before).
        if !matches!(kind, b'R' | b'S' | b'K' | b'N' | b'v' | b'E') || !(4..=MAX_STARTUP_ANSWER).contains(&len) {
            return StartupAnswer::Handover;
        }
        let Some(body) = rest.get(5..1 + len) else { return cut_short };
        match kind {
            // AuthenticationOk: the client is not asked anything.
            b'R' if body == [0, 0, 0, 0] => {}
            // ParameterStatus, BackendKeyData, NoticeResponse, NegotiateProtocolVersion.
            b'S' | b'K' | b'N' | b'v' => {}
            b'E' => {
                return match error_code(body) {
                    Some((code, message)) if server_unavailable(code) => StartupAnswer::NotServed { code, message },
                    _ => StartupAnswer::Handover,
                }
            }
            _ => return StartupAnswer::Handover,
        }
        rest = &rest[1 + len..];
    }
}

/// The SQLSTATE (`C`) and message (`M`) fields of an `ErrorResponse` body (after its type
/// byte and length). `None` if the body is malformed.
pub fn error_code(body: &[u8]) -> Option<(&str, &str)> {
    let (mut code, mut message) = (None, "");
    let mut rest = body;
    while let Some((&tag, tail)) = rest.split_first() {
        if tag == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0)?;
        let value = std::str::from_utf8(&tail[..end]).ok()?;
        match tag {
            b'C' => code = Some(value),
            b'M' => message = value,
            _ => {}
        }
        rest = &tail[end + 1..];
    }
    code.map(|c| (c, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// A trust login's whole answer: AuthenticationOk, two parameter statuses, the key, ready.
    fn trust_login() -> Vec<u8> {
        [
            msg(b'R', &[0, 0, 0, 0]),
            msg(b'S', b"server_version\x0015.8\0"),
            msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0"),
            msg(b'S', b"TimeZone\0UTC\0"),
            msg(b'K', &[0, 0, 0, 42, 1, 2, 3, 4]),
            msg(b'Z', b"I"),
        ]
        .concat()
    }

    #[test]
    fn a_startup_answer_is_incomplete_until_ready_and_every_prefix_of_it_too() {
        let all = trust_login();
        // ReadyForQuery hands over as soon as its header is in (its 1-byte body follows in the pipe).
        let ready_header = all.len() - 1;
        for cut in 0..all.len() {
            let want = if cut < ready_header { StartupAnswer::Incomplete } else { StartupAnswer::Handover };
            assert_eq!(startup_answer(&all[..cut]), want, "cut at {cut} of {}", all.len());
        }
        assert_eq!(startup_answer(&all), StartupAnswer::Handover);
        let echo = [0, 0, 0, 16, 0, 3, 0, 0, b'u', b's', b'e', b'r', 0, b'u', 0, 0];
        assert_eq!(startup_answer(&echo[..5]), StartupAnswer::Handover, "not a message: handed over at its header");
    }

    #[test]
    fn the_client_s_turn_or_a_final_error_hands_the_answer_over() {
        for auth in [5u32, 10, 3] {
            // MD5, SASL, cleartext password requests: the client must answer.
            let m = msg(b'R', &[&auth.to_be_bytes()[..], &[0; 4]].concat());
            assert_eq!(startup_answer(&m), StartupAnswer::Handover, "auth request {auth}");
        }
        for code in ["28P01", "3D000", "53300", "28000"] {
            let e = error_response(code, "no");
            assert_eq!(startup_answer(&e), StartupAnswer::Handover, "{code} is the client's answer");
            let after_ok = [msg(b'R', &[0; 4]), e].concat();
            assert_eq!(startup_answer(&after_ok), StartupAnswer::Handover, "{code} after AuthenticationOk");
        }
        assert_eq!(startup_answer(&msg(b'X', b"")), StartupAnswer::Handover, "an unknown message");
        assert_eq!(startup_answer(&[b'S', 0, 0, 0, 2]), StartupAnswer::Handover, "a length below 4");
        let huge = [b'S', 0, 0, 0x80, 0];
        assert_eq!(startup_answer(&huge), StartupAnswer::Handover, "a length above the cap");
        let big = [msg(b'R', &[0; 4]), msg(b'N', &vec![b'x'; MAX_STARTUP_ANSWER - 6])].concat();
        assert_eq!(startup_answer(&big[..MAX_STARTUP_ANSWER - 1]), StartupAnswer::Incomplete);
        assert_eq!(startup_answer(&big[..MAX_STARTUP_ANSWER]), StartupAnswer::Handover, "cut short at the cap");
    }

    #[test]
    fn a_stopping_server_did_not_serve_the_session_even_after_authentication() {
        for code in ["57P01", "57P02", "57P03"] {
            let e = error_response(code, "terminating connection due to administrator command");
            let want =
                StartupAnswer::NotServed { code, message: "terminating connection due to administrator command" };
            assert_eq!(startup_answer(&e), want);
            let mut all = trust_login();
            all.truncate(all.len() - 6 - 13);
            all.extend_from_slice(&e);
            assert_eq!(startup_answer(&all), want, "{code} after AuthenticationOk and parameter statuses");
        }
    }

    #[test]
    fn error_code_reads_sqlstate_and_message() {
        let e = error_response("57P03", "the database system is shutting down");
        assert_eq!(error_code(&e[5..]), Some(("57P03", "the database system is shutting down")));
        assert_eq!(error_code(b"SFATAL\0"), None, "no code");
        assert_eq!(error_code(b"C57P03"), None, "unterminated");
        assert_eq!(error_code(b""), None);
    }

    proptest::proptest! {
        #[test]
        fn error_code_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = error_code(&body);
        }
    }
    use tokio::io::duplex;

    fn startup_packet() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&196608u32.to_be_bytes());
        body.extend_from_slice(b"user\0app\0database\0app\0\0");
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend(body);
        p
    }

    fn request(code: u32) -> Vec<u8> {
        let mut p = 8u32.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p
    }

    fn message(t: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![t];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// What a PostgreSQL 15 server sends after a startup with trust authentication.
    fn server_hello(pid: u32, secret: &[u8]) -> Vec<u8> {
        let mut out = message(b'R', &0u32.to_be_bytes());
        out.extend(message(b'S', b"server_version\x0015.8\0"));
        out.extend(message(b'S', b"client_encoding\0UTF8\0"));
        let mut k = pid.to_be_bytes().to_vec();
        k.extend_from_slice(secret);
        out.extend(message(b'K', &k));
        out.extend(message(b'Z', b"I"));
        out
    }

    fn key_of(pid: u32, secret: &[u8]) -> Vec<u8> {
        let mut k = pid.to_be_bytes().to_vec();
        k.extend_from_slice(secret);
        k
    }

    #[test]
    fn error_response_layout() {
        let e = error_response("57P03", "no primary");
        assert_eq!(e[0], b'E');
        let len = u32::from_be_bytes(e[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, e.len());
        assert_eq!(&e[5..], b"SFATAL\0VFATAL\0C57P03\0Mno primary\0\0");
    }

    #[tokio::test]
    async fn first_packets_are_read_whole_and_classified() {
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&key_of(42, &[1, 2, 3, 4]));
        // Protocol 3.2: a 32-byte secret.
        let mut cancel32 = (12u32 + 32).to_be_bytes().to_vec();
        cancel32.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        cancel32.extend_from_slice(&key_of(7, &[9; 32]));
        let mut tls = vec![0x16, 0x03, 0x01, 0x00, 0x30];
        tls.extend_from_slice(&[0xab; 0x30]);
        // Over the first read's 512 bytes: the rest is read to its length.
        let mut long_body = 196608u32.to_be_bytes().to_vec();
        long_body.extend_from_slice(b"user\0app\0options\0");
        long_body.extend_from_slice(&[b'x'; 2000]);
        long_body.extend_from_slice(b"\0\0");
        let mut long_startup = ((long_body.len() + 4) as u32).to_be_bytes().to_vec();
        long_startup.extend(long_body);
        let cases = [
            (startup_packet(), Kind::Startup { version: 196608 }),
            (long_startup, Kind::Startup { version: 196608 }),
            (request(SSL_REQUEST), Kind::SslRequest),
            (request(GSSENC_REQUEST), Kind::GssEncRequest),
            (cancel.clone(), Kind::Cancel),
            (cancel32.clone(), Kind::Cancel),
            (tls.clone(), Kind::DirectTls),
        ];
        for (bytes, kind) in cases.clone() {
            // Whole, and in pieces: the header split, the body later.
            for split in [None, Some(3), Some(8)] {
                let (mut client, mut server) = duplex(64 * 1024);
                let sent = bytes.clone();
                let writer = tokio::spawn(async move {
                    let at = split.unwrap_or(sent.len());
                    client.write_all(&sent[..at]).await.unwrap();
                    tokio::task::yield_now().await;
                    client.write_all(&sent[at..]).await.unwrap();
                    client
                });
                let p = read_first(&mut server).await.unwrap();
                assert_eq!(p, FirstPacket { kind, bytes: bytes.clone() }, "{kind:?}, split at {split:?}");
                drop(writer.await.unwrap());
            }
        }
        let p = FirstPacket { kind: Kind::Cancel, bytes: cancel32 };
        assert_eq!(p.cancel_key(), Some(&key_of(7, &[9; 32])[..]));

        // A client that does not wait for the answer: what follows a startup or a TLS record
        // in the first read is kept, to be forwarded after it; a cancel is cut at its length; an encryption
        // request followed by data is not PostgreSQL (the server itself rejects it).
        for (bytes, kind) in cases {
            let (mut client, mut server) = duplex(64 * 1024);
            let mut sent = bytes.clone();
            sent.extend_from_slice(b"next packet");
            client.write_all(&sent).await.unwrap();
            let p = read_first(&mut server).await.unwrap();
            let expect = match kind {
                // Kept when it came within the first read; after a longer packet, the rest is
                // read to its length only.
                Kind::Startup { .. } | Kind::DirectTls if sent.len() <= FIRST_READ => FirstPacket { kind, bytes: sent },
                Kind::Startup { .. } | Kind::DirectTls | Kind::Cancel => FirstPacket { kind, bytes },
                _ => FirstPacket { kind: Kind::Invalid, bytes: Vec::new() },
            };
            assert_eq!(p, expect, "{kind:?} and more");
        }
    }

    #[tokio::test]
    async fn a_first_packet_cut_short_by_the_end_of_the_stream_is_an_error() {
        for sent in [&request(SSL_REQUEST)[..5], &startup_packet()[..20]] {
            let (mut client, mut server) = duplex(1024);
            client.write_all(sent).await.unwrap();
            drop(client);
            let e = read_first(&mut server).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        }
    }

    #[tokio::test]
    async fn hostile_lengths_are_refused_before_allocating() {
        let mut huge = (2u32 << 30).to_be_bytes().to_vec();
        huge.extend_from_slice(&196608u32.to_be_bytes());
        let mut long_cancel = (12u32 + 257).to_be_bytes().to_vec();
        long_cancel.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        let mut ssl_with_body = 9u32.to_be_bytes().to_vec();
        ssl_with_body.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        for bytes in [huge, long_cancel, ssl_with_body, b"GET / HTTP/1.1\r\n\r\n".to_vec()] {
            let (mut client, mut server) = duplex(1024);
            client.write_all(&bytes).await.unwrap();
            let p = read_first(&mut server).await.unwrap();
            assert_eq!(p, FirstPacket { kind: Kind::Invalid, bytes: Vec::new() });
        }
    }

    #[tokio::test]
    async fn ssl_request_then_startup_gets_n_then_error() {
        let (mut client, mut server) = duplex(1024);
        client.write_all(&request(SSL_REQUEST)).await.unwrap();
        let first = read_first(&mut server).await.unwrap();
        let refusing = tokio::spawn(async move {
            refuse(&mut server, first.kind, "57P03", "no primary available", Duration::from_secs(5)).await
        });
        // As libpq does: the startup only once the `N` is read.
        let mut n = [0u8; 1];
        client.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        client.write_all(&startup_packet()).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, error_response("57P03", "no primary available"));
        refusing.await.unwrap();
    }

    #[tokio::test]
    async fn garbage_and_cancels_are_closed_without_answer() {
        for first in [Kind::Invalid, Kind::Cancel, Kind::DirectTls] {
            let (mut client, mut server) = duplex(1024);
            refuse(&mut server, first, "57P03", "x", Duration::from_secs(5)).await;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert!(got.is_empty());
        }
    }

    #[test]
    fn scanner_finds_the_key_in_any_chunking() {
        let stream = server_hello(4242, &[0xde, 0xad, 0xbe, 0xef]);
        for chunk in 1..stream.len() {
            let mut s = KeyScanner::new(Kind::Startup { version: 196608 });
            let mut found = None;
            for c in stream.chunks(chunk) {
                match s.feed(c) {
                    Scanned::More => {}
                    Scanned::Key(k) => {
                        found = Some(k);
                        break;
                    }
                    Scanned::NoKey(why) => panic!("{why:?} at chunk size {chunk}"),
                }
            }
            assert_eq!(found.unwrap().as_bytes(), key_of(4242, &[0xde, 0xad, 0xbe, 0xef]));
        }
    }

    #[test]
    fn scanner_after_negotiation_and_with_long_keys() {
        // GSSENCRequest and SSLRequest both answered N, then the startup.
        let mut stream = b"NN".to_vec();
        stream.extend(server_hello(1, &[5; 32]));
        let mut s = KeyScanner::new(Kind::GssEncRequest);
        assert_eq!(s.feed(&stream), Scanned::Key(CancelKey::from_bytes(&key_of(1, &[5; 32]))));
        // The longest secret protocol 3.2 allows goes to the heap.
        let long = server_hello(2, &[6; MAX_SECRET_LEN]);
        let mut s = KeyScanner::new(Kind::Startup { version: 196610 });
        match s.feed(&long) {
            Scanned::Key(k @ CancelKey::Heap(_)) => assert_eq!(k.as_bytes(), key_of(2, &[6; MAX_SECRET_LEN])),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.feed(b"more"), Scanned::NoKey(NoKey::NotSent), "a key is reported once");
    }

    #[test]
    fn scanner_gives_up_where_the_key_cannot_be_seen() {
        let enc = |first, bytes: &[u8]| KeyScanner::new(first).feed(bytes);
        assert_eq!(enc(Kind::SslRequest, b"S\x16\x03\x03"), Scanned::NoKey(NoKey::Encrypted));
        assert_eq!(enc(Kind::GssEncRequest, b"G"), Scanned::NoKey(NoKey::Encrypted));
        assert_eq!(enc(Kind::GssEncRequest, b"NS"), Scanned::NoKey(NoKey::Encrypted));
        assert_eq!(enc(Kind::DirectTls, b"\x16"), Scanned::NoKey(NoKey::Encrypted));
        let err = error_response("28000", "no pg_hba.conf entry");
        assert_eq!(enc(Kind::Startup { version: 196608 }, &err), Scanned::NoKey(NoKey::NotSent));
        assert_eq!(enc(Kind::SslRequest, &[b"N".as_slice(), &err].concat()), Scanned::NoKey(NoKey::NotSent));
        let ready = message(b'Z', b"I");
        assert_eq!(enc(Kind::Startup { version: 196608 }, &ready), Scanned::NoKey(NoKey::NotSent));
        // A key message of an impossible size, a length below 4, a body longer than the scan.
        let bad_k = message(b'K', &[0; 3]);
        assert_eq!(enc(Kind::Startup { version: 196608 }, &bad_k), Scanned::NoKey(NoKey::GaveUp));
        assert_eq!(enc(Kind::Startup { version: 196608 }, b"R\0\0\0\x02"), Scanned::NoKey(NoKey::GaveUp));
        assert_eq!(enc(Kind::Startup { version: 196608 }, b"R\x7f\xff\xff\xff"), Scanned::NoKey(NoKey::GaveUp));
        // Many small messages: gives up after MAX_SCAN bytes.
        let mut s = KeyScanner::new(Kind::Startup { version: 196608 });
        let notice = message(b'N', &[b'x'; 100]);
        let mut fed = 0;
        let r = loop {
            match s.feed(&notice) {
                Scanned::More => fed += notice.len(),
                other => break other,
            }
            assert!(fed <= MAX_SCAN + notice.len());
        };
        assert_eq!(r, Scanned::NoKey(NoKey::GaveUp));
        assert_eq!(enc(Kind::Cancel, b"anything"), Scanned::NoKey(NoKey::NoSession));
    }

    #[test]
    fn cancel_keys_hash_and_compare_as_their_bytes() {
        use std::collections::HashMap;
        let mut m = HashMap::new();
        m.insert(CancelKey::from_bytes(&key_of(1, &[1; 4])), "a");
        m.insert(CancelKey::from_bytes(&key_of(1, &[1; 100])), "b");
        assert_eq!(m.get(&key_of(1, &[1; 4])[..]), Some(&"a"));
        assert_eq!(m.get(&key_of(1, &[1; 100])[..]), Some(&"b"));
        assert_eq!(m.get(&key_of(1, &[2; 4])[..]), None);
        assert!(!format!("{:?}", CancelKey::from_bytes(&key_of(1, &[0xee; 4]))).contains("238"));
    }
}
