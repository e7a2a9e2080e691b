//! Hostile input for the parts of pgfront that read bytes before a session is placed
//! (issue 6, "Hostile input"): the client's first packet (startup, SSLRequest, GSSENCRequest,
//! CancelRequest, direct TLS), the refusal path that reads on after an encryption request, and
//! the server-side `BackendKeyData` scanner, fed in random chunkings.
//!
//! Properties, a few thousand cases each: no panic; termination (every input is finite and
//! ends with EOF); nothing allocated from an untrusted length beyond the caps (a global
//! allocator records the largest single allocation of this thread around each call); the
//! scanner's answer does not depend on how the bytes were cut; the reader of a startup's
//! answer decides once (more bytes never change a decision, which the connect relies on when
//! it reads until one is made) and always decides by `MAX_STARTUP_ANSWER` bytes.
//!
//! Found and kept: an SSLRequest code with length 9 was once taken for a StartupMessage of
//! "version" 1234.5679 and waited for a body that never came (`pgwire::tests::
//! hostile_lengths_are_refused_before_allocating`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::pin::Pin;
use std::task::{Context, Poll};

use pgfront::proxy::pgwire::{
    classify, read_first, refuse, startup_answer, KeyScanner, Kind, Scanned, StartupAnswer, CANCEL_REQUEST,
    GSSENC_REQUEST, MAX_SCAN, MAX_SECRET_LEN, MAX_STARTUP_ANSWER, MAX_STARTUP_LEN, MAX_TLS_RECORD, SSL_REQUEST,
};
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Records the largest allocation made by the current thread since `reset`.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| {
        if size > m.get() {
            m.set(size)
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

fn largest_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    RT.with(|_| ()); // the runtime is built on first use: not counted
    LARGEST.with(|m| m.set(0));
    let r = f();
    (r, LARGEST.with(|m| m.get()))
}

/// Overhead allowed on top of the caps (the runtime's own bookkeeping for a `block_on`).
const SLACK: usize = 4096;

/// A client that sends `data` cut at `cuts`, then EOF; whatever is written to it is kept.
struct Chunked<'a> {
    data: &'a [u8],
    cuts: &'a [usize],
    i: usize,
    written: Vec<u8>,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let cut = self.cuts[self.i % self.cuts.len()].max(1);
        let n = cut.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.i += 1;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked<'_> {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        // Bounded: a refusal writes `N`s and one ErrorResponse, never more.
        assert!(self.written.len() < 4096, "unbounded output");
        self.written.extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

thread_local! {
    static RT: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RT.with(|rt| rt.block_on(f))
}

/// First packets: plain noise, PostgreSQL headers with hostile lengths and any code, TLS-like
/// records, and sequences of them (an encryption request followed by more).
fn client_bytes() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![0u32..20, 0u32..300, 0u32..12_000, Just(1u32 << 31), Just(u32::MAX), any::<u32>()];
    let code = prop_oneof![
        Just(SSL_REQUEST),
        Just(GSSENC_REQUEST),
        Just(CANCEL_REQUEST),
        Just(196_608u32),
        Just(196_610u32),
        Just(131_072u32),
        any::<u32>()
    ];
    let packet = (len, code, prop::collection::vec(any::<u8>(), 0..600)).prop_map(|(len, code, tail)| {
        let mut p = len.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend(tail);
        p
    });
    let tls = (any::<u8>(), any::<u16>(), prop::collection::vec(any::<u8>(), 0..600)).prop_map(|(v, len, tail)| {
        let mut p = vec![0x16, 0x03, v];
        p.extend_from_slice(&len.to_be_bytes());
        p.extend(tail);
        p
    });
    let one = prop_oneof![prop::collection::vec(any::<u8>(), 0..64), packet, tls];
    prop::collection::vec(one, 1..4).prop_map(|v| v.concat())
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..4, 1usize..64, 1usize..5000], 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn first_packet_reader(data in client_bytes(), cuts in cuts()) {
        let mut c = Chunked { data: &data, cuts: &cuts, i: 0, written: Vec::new() };
        let (r, largest) = largest_during(|| block_on(read_first(&mut c)));
        prop_assert!(largest <= MAX_TLS_RECORD + SLACK, "allocated {largest} bytes");
        if let Ok(p) = r {
            prop_assert!(data.len() >= 8);
            let (kind, len) = classify(data[..8].try_into().unwrap());
            // What the client sent past the packet and `read_first` read with it.
            let extra = p.bytes.len().saturating_sub(len);
            match kind {
                // An encryption request followed by more is not PostgreSQL (if the more came in
                // the same read).
                Kind::SslRequest | Kind::GssEncRequest if p.kind == Kind::Invalid => {
                    prop_assert!(data.len() > len);
                }
                _ => prop_assert_eq!(p.kind, kind),
            }
            if p.kind == Kind::Invalid {
                prop_assert!(p.bytes.is_empty());
                prop_assert!(largest <= SLACK, "no more than the first read for an invalid header: {}", largest);
            } else {
                // The packet whole, then (after a startup or a TLS record only) what followed
                // it in the same read, never past the first read's size.
                prop_assert_eq!(&p.bytes[..], &data[..p.bytes.len()]);
                prop_assert!(p.bytes.len() >= len);
                if extra > 0 {
                    prop_assert!(matches!(kind, Kind::Startup { .. } | Kind::DirectTls), "{:?} kept {} more", kind, extra);
                    prop_assert!(p.bytes.len() <= 512, "{} bytes read past a packet of {}", p.bytes.len(), len);
                }
                let cap = if kind == Kind::DirectTls { MAX_TLS_RECORD } else { MAX_STARTUP_LEN };
                prop_assert!(len <= cap);
            }
            if let Kind::Startup { version } = kind {
                prop_assert!((2..=3).contains(&(version >> 16)), "the special request codes are not versions");
            }
            if kind == Kind::Cancel {
                let key = p.cancel_key().unwrap();
                prop_assert!((8..=4 + MAX_SECRET_LEN).contains(&key.len()));
            }
        }
    }

    #[test]
    fn refusal_reads_on_boundedly(data in client_bytes(), cuts in cuts()) {
        let mut c = Chunked { data: &data, cuts: &cuts, i: 0, written: Vec::new() };
        let (_, largest) = largest_during(|| block_on(async {
            let first = read_first(&mut c).await.map(|p| p.kind).unwrap_or(Kind::Invalid);
            refuse(&mut c, first, "57P03", "fuzz", std::time::Duration::from_secs(5)).await;
        }));
        prop_assert!(largest <= MAX_TLS_RECORD + SLACK, "allocated {largest} bytes");
        // Only `N`s, then at most one ErrorResponse.
        let n = c.written.iter().take_while(|b| **b == b'N').count();
        prop_assert!(n <= 3);
        let rest = &c.written[n..];
        prop_assert!(rest.is_empty() || rest[0] == b'E', "{:?}", rest);
    }
}

/// Server output: encryption answers, then messages of any type with bodies of any length
/// (lengths sometimes lying), `BackendKeyData` among them with secrets of any size.
fn server_bytes() -> impl Strategy<Value = Vec<u8>> {
    let answers = prop::collection::vec(prop_oneof![Just(b'N'), Just(b'S'), Just(b'G'), any::<u8>()], 0..3);
    let typ =
        prop_oneof![Just(b'R'), Just(b'S'), Just(b'N'), Just(b'v'), Just(b'K'), Just(b'Z'), Just(b'E'), any::<u8>()];
    let message = (
        typ,
        prop::collection::vec(any::<u8>(), 0..400),
        prop_oneof![Just(None), Just(Some(0u32)), any::<u32>().prop_map(Some)],
    )
        .prop_map(|(t, body, lie)| {
            let mut m = vec![t];
            let len = lie.unwrap_or(body.len() as u32 + 4);
            m.extend_from_slice(&len.to_be_bytes());
            m.extend(body);
            m
        });
    (answers, prop::collection::vec(message, 0..12), prop::collection::vec(any::<u8>(), 0..32))
        .prop_map(|(a, ms, noise)| [a, ms.concat(), noise].concat())
}

fn scan(first: Kind, data: &[u8], cuts: &[usize]) -> Scanned {
    let mut s = KeyScanner::new(first);
    let mut rest = data;
    let mut i = 0;
    let mut last = Scanned::More;
    while !rest.is_empty() {
        let n = cuts[i % cuts.len()].max(1).min(rest.len());
        last = s.feed(&rest[..n]);
        rest = &rest[n..];
        i += 1;
        if last != Scanned::More {
            break;
        }
    }
    last
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn key_scanner(
        data in server_bytes(),
        cuts in cuts(),
        first in prop_oneof![Just(Kind::Startup { version: 196_608 }), Just(Kind::SslRequest), Just(Kind::GssEncRequest), Just(Kind::DirectTls)],
    ) {
        let (whole, largest) = largest_during(|| scan(first, &data, &[usize::MAX]));
        prop_assert!(largest <= 4 + MAX_SECRET_LEN + 64, "allocated {largest} bytes");
        let chunked = scan(first, &data, &cuts);
        prop_assert_eq!(&whole, &chunked, "the answer does not depend on the chunking");
        if let Scanned::Key(k) = &whole {
            prop_assert!((8..=4 + MAX_SECRET_LEN).contains(&k.as_bytes().len()));
        }
        if data.len() >= MAX_SCAN {
            prop_assert!(whole != Scanned::More);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn startup_answer_decides_once(data in server_bytes(), filler in 0usize..2) {
        // Sometimes pad with a long notice so the cap is reached.
        let mut data = data;
        if filler == 1 {
            let mut pad = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'N'];
            pad.extend_from_slice(&((MAX_STARTUP_ANSWER as u32) - 10).to_be_bytes());
            pad.resize(MAX_STARTUP_ANSWER + 100, b'x');
            data = [pad, data].concat();
        }
        let mut decided: Option<StartupAnswer<'_>> = None;
        for cut in 0..=data.len() {
            let now = startup_answer(&data[..cut]);
            match decided {
                Some(d) => prop_assert_eq!(now, d, "a decision changed at {}", cut),
                None if now != StartupAnswer::Incomplete => {
                    decided = Some(now);
                    prop_assert!(cut >= 5, "decided before a message header at {}", cut);
                }
                None => prop_assert!(cut < MAX_STARTUP_ANSWER, "undecided at {} bytes", cut),
            }
        }
    }
}

/// Many messages without a key: the scanner stops after `MAX_SCAN` bytes whatever the cuts.
#[test]
fn key_scanner_gives_up_on_endless_messages() {
    let mut stream = Vec::new();
    while stream.len() < MAX_SCAN + 1000 {
        stream.extend_from_slice(&[b'N', 0, 0, 0, 104]);
        stream.extend_from_slice(&[b'x'; 100]);
    }
    for cut in [1, 7, 4096, usize::MAX] {
        let r = scan(Kind::Startup { version: 196_608 }, &stream, &[cut]);
        assert!(matches!(r, Scanned::NoKey(_)), "{r:?} at cut {cut}");
    }
}
