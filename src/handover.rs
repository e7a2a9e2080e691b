//! Listening sockets handed from a running pgfront to its successor (binary upgrade), or from
//! systemd (socket activation), so that a new process serves the very sockets the old one
//! accepted on: nothing is closed or re-bound, and a connection already waiting in a kernel
//! accept queue is accepted by whichever process calls `accept` next.
//!
//! Two sources, one result (`Vec<Inherited>`, each socket with a name as in systemd's
//! `LISTEN_FDNAMES`):
//! - [`from_systemd`]: `LISTEN_PID` / `LISTEN_FDS` / `LISTEN_FDNAMES` (systemd socket activation).
//! - [`receive`]: the successor's side of a hand-over over a Unix stream socket whose path the old
//!   process passes in [`HANDOVER_ENV`]; the old process runs an [`Offer`] there.
//!
//! Sequence of an upgrade (HAProxy's `-x`, cloudflare/ecdysis, same idea):
//! 1. old: [`Offer::bind`] (mode 0600, flock'ed so two hand-overs never share a path), then
//!    [`spawn_successor`] with the executable path resolved at start-up ([`startup_exe`]);
//! 2. old: [`Offer::hand_over`] accepts the successor, checks its uid, sends a header (protocol
//!    version, names, the caller's opaque `state`) and the descriptors with SCM_RIGHTS in
//!    batches of at most [`MAX_FDS_PER_MESSAGE`], then waits for `READY` until the deadline;
//! 3. new: [`receive`] gets names, descriptors and state; it starts serving them (both
//!    processes now accept from the same queues), takes over what `state` describes, then calls
//!    [`Ready::send`]. Dropping [`Ready`] (or [`Ready::fail`]) tells the old process it failed;
//! 4. old, on `Ok(pid)`: tells systemd `MAINPID=pid` (see `sysd`), *closes* (drops) its
//!    listening descriptors — never `shutdown(2)` them, which would stop the shared socket for
//!    the new process too — and drains its sessions. On `Err` it keeps serving and logs why.
//!
//! Invariants: the descriptors are shared open file descriptions, so their status flags
//! (`O_NONBLOCK`) are shared with the other process: never make an inherited socket blocking.
//! Every length read from the peer is bounded before anything is allocated; a malformed peer
//! gives an error, never a panic. Received descriptors are owned (`OwnedFd`) from the moment they
//! arrive and get `FD_CLOEXEC`, so an error closes them and no child inherits them.
//!
//! Wire format (all integers big-endian), old → new:
//! `"PGFH" | version u16 | header_len u32 | header`, header = `count u32 | count × (len u16 |
//! name) | state_len u32 | state`; then per batch `'F' | n u16` carrying `n` descriptors.
//! New → old: `'R'` (ready) or `'E' | len u16 | reason` (failed), or EOF (failed, no reason).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

/// Environment variable through which the old process tells its successor where to fetch the
/// sockets. Its presence is what makes a starting process a successor.
pub(crate) const HANDOVER_ENV: &str = "PGFRONT_HANDOVER";
/// Version of the wire format; a successor that speaks another one refuses the hand-over (and the
/// old process keeps serving).
pub(crate) const PROTOCOL_VERSION: u16 = 1;
/// Descriptors per SCM_RIGHTS message: the kernel refuses more than 253 (SCM_MAX_FD) in one.
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 250;
/// Most descriptors in one hand-over (a bound for the header, far above any real config).
pub(crate) const MAX_FDS: usize = 4096;
/// Longest name, as systemd's FDNAME_MAX.
pub(crate) const MAX_NAME_LEN: usize = 255;
/// Largest opaque state blob.
pub(crate) const MAX_STATE_LEN: usize = 1 << 20;
/// Longest failure reason a successor may send back.
pub(crate) const MAX_REASON_LEN: usize = 1024;
/// The fd name of the admin endpoint's socket.
pub(crate) const ADMIN_FD_NAME: &str = "admin";

const MAGIC: [u8; 4] = *b"PGFH";
const PREAMBLE_LEN: usize = 4 + 2 + 4;
const MAX_HEADER_LEN: usize = 4 + MAX_FDS * (2 + MAX_NAME_LEN) + 4 + MAX_STATE_LEN;
const TAG_FDS: u8 = b'F';
const TAG_READY: u8 = b'R';
const TAG_FAILED: u8 = b'E';
const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// A socket received from systemd or from the previous process.
#[derive(Debug)]
pub(crate) struct Inherited {
    /// As in `LISTEN_FDNAMES`: [`listener_fd_name`] or [`ADMIN_FD_NAME`] ("unknown" when systemd
    /// was given no `FileDescriptorName=`).
    pub(crate) name: String,
    pub(crate) fd: OwnedFd,
}

/// The fd name of a listener's socket. A `.` separates the parts because systemd forbids `:` in
/// fd names (it separates them in `LISTEN_FDNAMES`); config names are `[A-Za-z0-9._-]`.
pub(crate) fn listener_fd_name(listener: &str) -> String {
    format!("listener.{listener}")
}

/// Removes and returns the first inherited socket called `name`. (The supervisor matches
/// sockets by their bound address, which survives a renamed listener; names are for humans.)
#[cfg(test)]
pub(crate) fn take(inherited: &mut Vec<Inherited>, name: &str) -> Option<OwnedFd> {
    let i = inherited.iter().position(|s| s.name == name)?;
    Some(inherited.remove(i).fd)
}

/// What went wrong with a hand-over.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    #[error("hand-over socket {path}: {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("hand-over socket {path}: another hand-over holds it (lock {lock})")]
    Busy { path: PathBuf, lock: PathBuf },
    #[error("hand-over socket {path}: no progress within {after:?} while {stage}")]
    Timeout { path: PathBuf, stage: &'static str, after: Duration },
    #[error("hand-over socket {path}: peer runs as uid {uid}, neither ours ({ours}) nor root")]
    PeerUid { path: PathBuf, uid: u32, ours: u32 },
    #[error("hand-over socket {path}: protocol error: {source}")]
    Protocol { path: PathBuf, source: ProtocolError },
    #[error("hand-over socket {path}: the successor (pid {pid}) failed: {reason}")]
    SuccessorFailed { path: PathBuf, pid: u32, reason: String },
    #[error("cannot offer these sockets: {0}")]
    Invalid(ProtocolError),
    #[error("cannot start the successor {exe}: {source}")]
    Spawn { exe: PathBuf, source: io::Error },
    #[error("cannot tell which executable to start for an upgrade (no usable argv[0] or /proc/self/exe)")]
    NoExecutable,
    #[error("systemd socket activation (LISTEN_FDS/LISTEN_FDNAMES): {0}")]
    Systemd(io::Error),
    #[error("systemd socket activation: fd {fd} ({name}) is not a socket")]
    NotASocket { fd: RawFd, name: String },
}

/// A malformed message, or values that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("bad magic {0:02x?}, not a pgfront hand-over")]
    BadMagic([u8; 4]),
    #[error("protocol version {got}, this binary speaks {PROTOCOL_VERSION}")]
    Version { got: u16 },
    #[error("header of {len} bytes, at most {MAX_HEADER_LEN}")]
    HeaderTooLarge { len: u64 },
    #[error("header truncated at byte {at}")]
    Truncated { at: usize },
    #[error("{extra} unexpected byte(s) after the header")]
    Trailing { extra: usize },
    #[error("{count} sockets, at most {MAX_FDS}")]
    TooManyFds { count: u64 },
    #[error("socket name #{index} is not a valid fd name (printable ASCII without ':', at most {MAX_NAME_LEN})")]
    BadName { index: usize },
    #[error("state of {len} bytes, at most {MAX_STATE_LEN}")]
    StateTooLarge { len: u64 },
    #[error("unexpected message tag {0:#04x}")]
    BadTag(u8),
    #[error("descriptor batch: {announced} announced, {received} received, {expected} expected")]
    BatchCount { expected: usize, announced: usize, received: usize },
    #[error("failure reason of {len} bytes, at most {MAX_REASON_LEN}")]
    ReasonTooLong { len: usize },
    #[error("connection closed while {during}")]
    Closed { during: &'static str },
}

/// systemd's `fdname_is_valid`: printable ASCII except `:`, at most 255 bytes (empty allowed).
pub(crate) fn valid_fd_name(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN && name.bytes().all(|b| (b' '..0x7f).contains(&b) && b != b':')
}

/// Encodes preamble and header. Pure.
fn encode_header(names: &[&str], state: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    if names.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds { count: names.len() as u64 });
    }
    if state.len() > MAX_STATE_LEN {
        return Err(ProtocolError::StateTooLarge { len: state.len() as u64 });
    }
    if let Some(index) = names.iter().position(|n| !valid_fd_name(n)) {
        return Err(ProtocolError::BadName { index });
    }
    let body_len = 4 + names.iter().map(|n| 2 + n.len()).sum::<usize>() + 4 + state.len();
    let mut out = Vec::with_capacity(PREAMBLE_LEN + body_len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    // Bounded by MAX_HEADER_LEN (checked above), far below u32::MAX.
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&(names.len() as u32).to_be_bytes());
    for n in names {
        out.extend_from_slice(&(n.len() as u16).to_be_bytes());
        out.extend_from_slice(n.as_bytes());
    }
    out.extend_from_slice(&(state.len() as u32).to_be_bytes());
    out.extend_from_slice(state);
    Ok(out)
}

/// Checks the preamble and returns the header length that follows. Pure.
fn decode_preamble(p: &[u8; PREAMBLE_LEN]) -> Result<usize, ProtocolError> {
    let magic = [p[0], p[1], p[2], p[3]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([p[4], p[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { got: version });
    }
    let len = u32::from_be_bytes([p[6], p[7], p[8], p[9]]) as usize;
    if len > MAX_HEADER_LEN {
        return Err(ProtocolError::HeaderTooLarge { len: len as u64 });
    }
    Ok(len)
}

/// Decodes the header into names and state. Pure; bounds every length before use.
fn decode_header(body: &[u8]) -> Result<(Vec<String>, Vec<u8>), ProtocolError> {
    let mut r = Reader { buf: body, at: 0 };
    let count = u32::from_be_bytes(r.array()?) as usize;
    if count > MAX_FDS {
        return Err(ProtocolError::TooManyFds { count: count as u64 });
    }
    let mut names = Vec::with_capacity(count);
    for index in 0..count {
        let len = u16::from_be_bytes(r.array()?) as usize;
        if len > MAX_NAME_LEN {
            return Err(ProtocolError::BadName { index });
        }
        let name = std::str::from_utf8(r.take(len)?).map_err(|_| ProtocolError::BadName { index })?;
        if !valid_fd_name(name) {
            return Err(ProtocolError::BadName { index });
        }
        names.push(name.to_owned());
    }
    let state_len = u32::from_be_bytes(r.array()?) as usize;
    if state_len > MAX_STATE_LEN {
        return Err(ProtocolError::StateTooLarge { len: state_len as u64 });
    }
    let state = r.take(state_len)?.to_vec();
    if r.at != body.len() {
        return Err(ProtocolError::Trailing { extra: body.len() - r.at });
    }
    Ok((names, state))
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(ProtocolError::Truncated { at: self.buf.len() })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

fn failure_frame(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(3 + end);
    out.push(TAG_FAILED);
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

/// `path` + `suffix`, in the same directory.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we borrow; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_socket(fd: BorrowedFd<'_>) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `struct stat` into the buffer we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// Takes the sockets systemd passed (socket activation), named by `LISTEN_FDNAMES`, and unsets
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` so that no child (a successor) mistakes them
/// for its own. Empty when they were meant for another process (`LISTEN_PID` is not ours) or
/// absent. The descriptors get `FD_CLOEXEC`; one that is not a socket is an error (systemd can
/// also pass FIFOs and files).
///
/// # Safety
/// Mutates the process environment: call it before any other thread exists, i.e. in `main`
/// before the tokio runtime is built (see `std::env::remove_var`).
pub(crate) unsafe fn from_systemd() -> Result<Vec<Inherited>, HandoverError> {
    // sd-notify 0.5 checks LISTEN_PID but then still pairs LISTEN_FDNAMES with zero fds and
    // fails: variables meant for another process (inherited from a parent) must give nothing.
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    if !ours {
        for v in LISTEN_VARS {
            // SAFETY: the caller guarantees no other thread reads or writes the environment.
            unsafe { std::env::remove_var(v) };
        }
        return Ok(Vec::new());
    }
    // SAFETY: the caller guarantees no other thread reads or writes the environment.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }.map_err(HandoverError::Systemd)?;
    let inherited: Vec<Inherited> = fds
        .map(|(raw, name)| Inherited {
            name,
            // SAFETY: systemd passed these descriptors to this very process (LISTEN_PID checked
            // by sd-notify) and nothing else in the process owns them.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
        .collect();
    if let Some(bad) = inherited.iter().find(|s| !is_socket(s.fd.as_fd())) {
        return Err(HandoverError::NotASocket { fd: bad.fd.as_raw_fd(), name: bad.name.clone() });
    }
    Ok(inherited)
}

/// The hand-over path given by the old process, when this process is a successor.
pub(crate) fn handover_path_from_env() -> Option<PathBuf> {
    std::env::var_os(HANDOVER_ENV).filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// The executable to start for an upgrade, resolved once at start-up.
///
/// Why at start-up, and why argv[0] first: a package upgrade replaces `/usr/bin/pgfront` by a
/// new file; from then on `/proc/self/exe` (what `current_exe` reads) names the old, deleted
/// inode ("/usr/bin/pgfront (deleted)"), so resolving the path at upgrade time would fail or
/// restart the old code. argv[0] as systemd passes it (`/usr/bin/pgfront`) is the name the
/// upgrade updates, including through an alternatives symlink, which `current_exe` would have
/// resolved to the old target. A relative argv[0] is made absolute against the start-up cwd;
/// a bare name (found through `PATH`) falls back to `current_exe`.
pub(crate) fn startup_exe() -> Result<PathBuf, HandoverError> {
    let argv0 = std::env::args_os().next();
    let cwd = std::env::current_dir().ok();
    choose_exe(argv0.as_deref(), cwd.as_deref(), std::env::current_exe().ok()).ok_or(HandoverError::NoExecutable)
}

/// Pure part of [`startup_exe`].
fn choose_exe(argv0: Option<&OsStr>, cwd: Option<&Path>, current_exe: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(a) = argv0.map(Path::new) {
        if a.is_absolute() {
            return Some(a.to_owned());
        }
        if a.components().count() > 1 {
            if let Some(cwd) = cwd {
                return Some(cwd.join(a));
            }
        }
    }
    current_exe.filter(|p| !p.as_os_str().as_encoded_bytes().ends_with(b" (deleted)"))
}

/// Starts the new binary as a successor: same arguments, same cwd and environment (so
/// `NOTIFY_SOCKET` stays and the new process can talk to systemd once it is the main pid), plus
/// [`HANDOVER_ENV`]`=handover_path`; stale `LISTEN_*` variables are removed. Call it after
/// [`Offer::bind`] so the path exists when the successor looks, and race [`Offer::hand_over`]
/// against `child.wait()`: a successor that exits at start-up then fails the upgrade at once
/// instead of at the deadline. A successor that fails must be killed by the caller
/// (`start_kill`), as the handle does not kill on drop. Needs a tokio runtime.
pub(crate) fn spawn_successor(
    exe: &Path,
    args: &[OsString],
    handover_path: &Path,
) -> Result<tokio::process::Child, HandoverError> {
    successor_command(exe, args, handover_path)
        .spawn()
        .map_err(|source| HandoverError::Spawn { exe: exe.to_owned(), source })
}

fn successor_command(exe: &Path, args: &[OsString], handover_path: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args).env(HANDOVER_ENV, handover_path).kill_on_drop(false);
    for v in LISTEN_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// The old process's side: a Unix socket at a path, waiting for one successor.
///
/// The socket file is created with mode 0600 (bound under a temporary name, chmod'ed, then
/// renamed into place) and removed when the successor has connected or the offer is dropped. A
/// `<path>.lock` file, flock'ed for the offer's lifetime, keeps two offers off one path and tells
/// a stale socket (left by a process that died) from a live one without connecting to it.
#[derive(Debug)]
pub(crate) struct Offer {
    listener: Option<UnixListener>,
    path: PathBuf,
    /// (device, inode) of the socket file we created, so Drop never removes another one.
    ident: Option<(u64, u64)>,
    _lock: fs::File,
}

impl Offer {
    /// Binds the hand-over socket at `path`. Needs a tokio runtime.
    pub(crate) fn bind(path: &Path) -> Result<Offer, HandoverError> {
        let io_err = |op: &'static str| move |source| HandoverError::Io { path: path.to_owned(), op, source };
        let lock_path = sibling(path, ".lock");
        let lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("open the lock file"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(HandoverError::Busy { path: path.to_owned(), lock: lock_path });
            }
            return Err(io_err("lock")(e));
        }
        match fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(io_err("refusing to replace a file that is not a socket")(
                    io::ErrorKind::AlreadyExists.into(),
                ))
            }
            _ => {}
        }
        let tmp = sibling(path, &format!(".{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let bound = std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err("bind"))?;
        let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod 0600"))
            .and_then(|()| fs::rename(&tmp, path).map_err(io_err("rename into place")));
        if let Err(e) = placed {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let mut offer = Offer { listener: None, path: path.to_owned(), ident: None, _lock: lock };
        // From here on Drop removes the file.
        offer.ident = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        bound.set_nonblocking(true).map_err(io_err("set non-blocking"))?;
        offer.listener = Some(UnixListener::from_std(bound).map_err(io_err("register with the runtime"))?);
        Ok(offer)
    }

    /// Hands `sockets` (name, descriptor) and `state` to the first process that connects, and
    /// waits for its `READY`; everything within `timeout`. Returns the successor's pid (from
    /// SO_PEERCRED) on `READY`. The old process keeps its own descriptors whatever happens: on
    /// `Ok` it closes them, on `Err` it keeps serving. Cancel-safe: dropping the future closes
    /// the connection, which the successor sees as a failed hand-over.
    pub(crate) async fn hand_over(
        mut self,
        sockets: &[(&str, BorrowedFd<'_>)],
        state: &[u8],
        timeout: Duration,
    ) -> Result<u32, HandoverError> {
        let deadline = Instant::now() + timeout;
        let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
        let header = encode_header(&names, state).map_err(HandoverError::Invalid)?;
        let path = self.path.clone();
        let listener = match self.listener.take() {
            Some(l) => l,
            None => return Err(self.io("accept", io::ErrorKind::NotConnected.into())),
        };
        let (mut stream, _) = self
            .within(deadline, timeout, "waiting for the successor to connect", async {
                listener.accept().await.map_err(|e| self.io("accept", e))
            })
            .await?;
        // One successor per offer: nobody else may connect from now on.
        drop(listener);
        self.unlink();

        let cred = stream.peer_cred().map_err(|e| self.io("read peer credentials", e))?;
        // SAFETY: geteuid has no failure mode.
        let ours = unsafe { libc::geteuid() };
        if cred.uid() != ours && cred.uid() != 0 {
            return Err(HandoverError::PeerUid { path, uid: cred.uid(), ours });
        }
        // Linux always fills it in; without it there would be no MAINPID= to give systemd.
        let pid = cred
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0)
            .ok_or_else(|| self.io("read peer credentials", io::Error::other("no pid")))?;
        let lost = |stage: &str, e: io::Error| {
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
            ) {
                HandoverError::SuccessorFailed { path: path.clone(), pid, reason: format!("{stage}: {e}") }
            } else {
                HandoverError::Io { path: path.clone(), op: "hand-over", source: e }
            }
        };

        self.within(deadline, timeout, "sending the sockets", async {
            stream.write_all(&header).await.map_err(|e| lost("while sending the header", e))?;
            for batch in sockets.chunks(MAX_FDS_PER_MESSAGE) {
                let fds: Vec<RawFd> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
                send_batch(&mut stream, &fds).await.map_err(|e| lost("while sending descriptors", e))?;
            }
            Ok(())
        })
        .await?;

        self.within(deadline, timeout, "waiting for the successor's READY", async {
            let mut tag = [0u8; 1];
            match stream.read_exact(&mut tag).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(HandoverError::SuccessorFailed {
                        path: path.clone(),
                        pid,
                        reason: "closed the hand-over connection without READY".into(),
                    })
                }
                Err(e) => return Err(lost("while waiting for READY", e)),
            }
            match tag[0] {
                TAG_READY => Ok(pid),
                TAG_FAILED => {
                    let mut len = [0u8; 2];
                    stream.read_exact(&mut len).await.map_err(|e| lost("reading its failure", e))?;
                    let len = u16::from_be_bytes(len) as usize;
                    if len > MAX_REASON_LEN {
                        return Err(self.protocol(ProtocolError::ReasonTooLong { len }));
                    }
                    let mut reason = vec![0u8; len];
                    stream.read_exact(&mut reason).await.map_err(|e| lost("reading its failure", e))?;
                    Err(HandoverError::SuccessorFailed {
                        path: path.clone(),
                        pid,
                        reason: String::from_utf8_lossy(&reason).into_owned(),
                    })
                }
                other => Err(self.protocol(ProtocolError::BadTag(other))),
            }
        })
        .await
    }

    async fn within<T>(
        &self,
        deadline: Instant,
        after: Duration,
        stage: &'static str,
        fut: impl std::future::Future<Output = Result<T, HandoverError>>,
    ) -> Result<T, HandoverError> {
        within(&self.path, deadline, after, stage, fut).await
    }

    fn io(&self, op: &'static str, source: io::Error) -> HandoverError {
        HandoverError::Io { path: self.path.clone(), op, source }
    }

    fn protocol(&self, source: ProtocolError) -> HandoverError {
        HandoverError::Protocol { path: self.path.clone(), source }
    }

    /// Removes the socket file if it is still the one we created.
    fn unlink(&mut self) {
        if let Some((dev, ino)) = self.ident.take() {
            if let Ok(m) = fs::symlink_metadata(&self.path) {
                if m.dev() == dev && m.ino() == ino {
                    let _ = fs::remove_file(&self.path);
                }
            }
        }
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        self.unlink();
    }
}

async fn within<T>(
    path: &Path,
    deadline: Instant,
    after: Duration,
    stage: &'static str,
    fut: impl std::future::Future<Output = Result<T, HandoverError>>,
) -> Result<T, HandoverError> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(HandoverError::Timeout { path: path.to_owned(), stage, after }),
    }
}

/// Sends one `'F' | n` frame carrying `fds` (at most [`MAX_FDS_PER_MESSAGE`]).
async fn send_batch(stream: &mut UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let n = fds.len() as u16;
    let frame = [TAG_FDS, (n >> 8) as u8, n as u8];
    loop {
        stream.writable().await?;
        match stream.send_with_fd(&frame, fds) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(sent) => {
                // The descriptors travel with the first byte; the rest, if the stream split the
                // frame, follows as plain bytes.
                return stream.write_all(&frame[sent..]).await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives one `'F' | n` frame and its descriptors, expecting `expected` of them. The buffer is
/// exactly the frame's size, so a read never reaches into the next batch.
async fn recv_batch(stream: &UnixStream, expected: usize, out: &mut Vec<OwnedFd>) -> Result<(), RecvError> {
    let mut frame = [0u8; 3];
    let mut got = 0;
    let mut raw = [-1 as RawFd; MAX_FDS_PER_MESSAGE];
    let mut received = Vec::new();
    while got < frame.len() {
        stream.readable().await.map_err(RecvError::Io)?;
        match stream.recv_with_fd(&mut frame[got..], &mut raw) {
            Ok((n, k)) => {
                for &fd in &raw[..k.min(raw.len())] {
                    // SAFETY: the kernel just installed this descriptor in our table for us.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    set_cloexec(fd.as_fd()).map_err(RecvError::Io)?;
                    received.push(fd);
                }
                if n == 0 {
                    return Err(RecvError::Protocol(ProtocolError::Closed { during: "receiving descriptors" }));
                }
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(RecvError::Io(e)),
        }
    }
    if frame[0] != TAG_FDS {
        return Err(RecvError::Protocol(ProtocolError::BadTag(frame[0])));
    }
    let announced = u16::from_be_bytes([frame[1], frame[2]]) as usize;
    if announced != expected || received.len() != expected {
        return Err(RecvError::Protocol(ProtocolError::BatchCount { expected, announced, received: received.len() }));
    }
    out.append(&mut received);
    Ok(())
}

enum RecvError {
    Io(io::Error),
    Protocol(ProtocolError),
}

/// Held by the successor between [`receive`] and the moment it serves: [`Ready::send`] lets
/// the old process stop accepting and drain; dropping it (or [`Ready::fail`]) tells the old
/// process that this one failed, and the old one keeps serving.
#[derive(Debug)]
#[must_use = "dropping Ready tells the old process that the successor failed"]
pub(crate) struct Ready {
    stream: UnixStream,
    path: PathBuf,
}

impl Ready {
    /// Tells the old process that this one serves.
    pub(crate) async fn send(mut self) -> Result<(), HandoverError> {
        self.write(&[TAG_READY]).await
    }

    /// Tells the old process why this one cannot take over (at most [`MAX_REASON_LEN`] bytes).
    pub(crate) async fn fail(mut self, reason: &str) -> Result<(), HandoverError> {
        self.write(&failure_frame(reason)).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), HandoverError> {
        self.stream.write_all(bytes).await.map_err(|source| HandoverError::Io {
            path: self.path.clone(),
            op: "reply to the old process",
            source,
        })
    }
}

/// The successor's side: connects to `path`, receives the sockets and the state, all within
/// `timeout`. On an error the old process is told why (best effort) and keeps serving; the
/// descriptors received so far are closed.
pub(crate) async fn receive(path: &Path, timeout: Duration) -> Result<(Vec<Inherited>, Vec<u8>, Ready), HandoverError> {
    let deadline = Instant::now() + timeout;
    let protocol = |source| HandoverError::Protocol { path: path.to_owned(), source };
    let stream = within(path, deadline, timeout, "connecting", async {
        UnixStream::connect(path).await.map_err(|source| HandoverError::Io {
            path: path.to_owned(),
            op: "connect",
            source,
        })
    })
    .await?;
    let mut stream = stream;
    let got = within(path, deadline, timeout, "receiving the header and the sockets", async {
        let eof = |during| {
            move |e: io::Error| match e.kind() {
                io::ErrorKind::UnexpectedEof => protocol(ProtocolError::Closed { during }),
                _ => HandoverError::Io { path: path.to_owned(), op: "read", source: e },
            }
        };
        let mut pre = [0u8; PREAMBLE_LEN];
        stream.read_exact(&mut pre).await.map_err(eof("reading the header"))?;
        let len = decode_preamble(&pre).map_err(protocol)?;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.map_err(eof("reading the header"))?;
        let (names, state) = decode_header(&body).map_err(protocol)?;
        let mut fds = Vec::with_capacity(names.len());
        while fds.len() < names.len() {
            let want = (names.len() - fds.len()).min(MAX_FDS_PER_MESSAGE);
            recv_batch(&stream, want, &mut fds).await.map_err(|e| match e {
                RecvError::Io(source) => HandoverError::Io { path: path.to_owned(), op: "receive descriptors", source },
                RecvError::Protocol(p) => protocol(p),
            })?;
        }
        let inherited = names.into_iter().zip(fds).map(|(name, fd)| Inherited { name, fd }).collect();
        Ok((inherited, state))
    })
    .await;
    match got {
        Ok((inherited, state)) => Ok((inherited, state, Ready { stream, path: path.to_owned() })),
        Err(e) => {
            // Best effort, without waiting: the old process would see EOF anyway.
            let _ = stream.try_write(&failure_frame(&e.to_string()));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;

    const T: Duration = Duration::from_secs(30);

    fn tcp_listener() -> std::net::TcpListener {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        l
    }

    fn cloexec(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: fcntl F_GETFD on a borrowed descriptor.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags >= 0 && flags & libc::FD_CLOEXEC != 0
    }

    /// Offers `listeners` under `names` and receives them in the same process.
    async fn hand_over_in_process(
        names: &[String],
        listeners: &[std::net::TcpListener],
        state: &[u8],
    ) -> (Result<u32, HandoverError>, Vec<Inherited>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        let offer = Offer::bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "hand-over socket must be 0600");
        let pairs: Vec<(&str, BorrowedFd<'_>)> =
            names.iter().map(String::as_str).zip(listeners.iter().map(|l| l.as_fd())).collect();
        let old = offer.hand_over(&pairs, state, T);
        let new = async {
            let (inh, st, ready) = receive(&path, T).await.unwrap();
            ready.send().await.unwrap();
            (inh, st)
        };
        let (res, (inh, st)) = tokio::join!(old, new);
        assert!(!path.exists(), "the socket file is removed once the successor has connected");
        (res, inh, st)
    }

    #[tokio::test]
    async fn queued_connection_is_accepted_through_the_received_fd() {
        let rw = tcp_listener();
        let admin = tcp_listener();
        let addr = rw.local_addr().unwrap();
        // Queued in the kernel backlog of the old socket, never accepted by the old process.
        let mut early = std::net::TcpStream::connect(addr).unwrap();
        early.write_all(b"before").unwrap();

        let names = vec![listener_fd_name("rw"), ADMIN_FD_NAME.to_string()];
        let (res, mut inh, state) = hand_over_in_process(&names, &[rw, admin], b"vip roles").await;
        // The old process closes its copies (the listeners were moved into the helper and
        // dropped there): only the successor's descriptors are left.
        assert_eq!(res.unwrap(), std::process::id());
        assert_eq!(state, b"vip roles");
        assert_eq!(inh.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["listener.rw", "admin"]);
        assert!(inh.iter().all(|i| cloexec(i.fd.as_fd())), "received descriptors are CLOEXEC");

        let fd = take(&mut inh, "listener.rw").unwrap();
        assert!(take(&mut inh, "listener.rw").is_none());
        let new = tokio::net::TcpListener::from_std(std::net::TcpListener::from(fd)).unwrap();
        assert_eq!(new.local_addr().unwrap(), addr);
        let (mut s, _) = tokio::time::timeout(T, new.accept()).await.unwrap().unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"before", "the connection queued before the hand-over is served");
        s.write_all(b"ok").await.unwrap();
        let mut reply = [0u8; 2];
        early.set_nonblocking(false).unwrap();
        early.read_exact(&mut reply).unwrap();

        // And one made after the old process closed its copy.
        let mut late = tokio::net::TcpStream::connect(addr).await.unwrap();
        late.write_all(b"after!").await.unwrap();
        let (mut s, _) = tokio::time::timeout(T, new.accept()).await.unwrap().unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after!");
    }

    /// Raises the soft descriptor limit to what `n` more descriptors need, if the hard one allows.
    fn raise_nofile(n: u64) {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit with a struct we own.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < n {
                lim.rlim_cur = n.min(lim.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }

    #[tokio::test]
    async fn three_hundred_sockets_cross_batches_in_order() {
        raise_nofile(4096);
        let listeners: Vec<_> = (0..300).map(|_| tcp_listener()).collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let names: Vec<String> = (0..300).map(|i| listener_fd_name(&format!("l{i}"))).collect();
        assert!(listeners.len() > MAX_FDS_PER_MESSAGE, "must need more than one SCM_RIGHTS message");
        let (res, inh, _) = hand_over_in_process(&names, &listeners, &[]).await;
        res.unwrap();
        assert_eq!(inh.len(), 300);
        for (i, s) in inh.into_iter().enumerate() {
            assert_eq!(s.name, names[i]);
            let l = std::net::TcpListener::from(s.fd);
            assert_eq!(l.local_addr().unwrap(), addrs[i], "socket #{i} is the one offered under its name");
        }
    }

    #[tokio::test]
    async fn successor_that_drops_ready_fails_the_hand_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let l = tcp_listener();
        let offer = Offer::bind(&path).unwrap();
        let pairs = [("admin", l.as_fd())];
        let new = async {
            let (inh, _, ready) = receive(&path, T).await.unwrap();
            drop(ready);
            inh
        };
        let (res, _inh) = tokio::join!(offer.hand_over(&pairs, b"", T), new);
        match res {
            Err(HandoverError::SuccessorFailed { pid, reason, .. }) => {
                assert_eq!(pid, std::process::id());
                assert!(reason.contains("without READY"), "{reason}");
            }
            other => panic!("expected SuccessorFailed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn successor_failure_reason_reaches_the_old_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let offer = Offer::bind(&path).unwrap();
        let new = async {
            let (_, _, ready) = receive(&path, T).await.unwrap();
            ready.fail("pgfront.toml:3: bind: address in use").await.unwrap();
        };
        let (res, ()) = tokio::join!(offer.hand_over(&[], b"", T), new);
        let e = res.unwrap_err();
        assert!(matches!(e, HandoverError::SuccessorFailed { .. }), "{e:?}");
        assert!(e.to_string().contains("pgfront.toml:3: bind: address in use"), "{e}");
    }

    /// A fake old process: accepts one connection and writes `bytes`, then holds it open until
    /// the returned sender is dropped.
    fn fake_old(path: &Path, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(&bytes);
            // Hold until the peer closes, so the error is about the bytes, not an EOF.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        })
    }

    #[tokio::test]
    async fn garbage_and_oversized_headers_are_clean_errors() {
        let mut oversized = MAGIC.to_vec();
        oversized.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        oversized.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut version = MAGIC.to_vec();
        version.extend_from_slice(&7u16.to_be_bytes());
        version.extend_from_slice(&0u32.to_be_bytes());
        let mut many = MAGIC.to_vec();
        many.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        many.extend_from_slice(&8u32.to_be_bytes());
        many.extend_from_slice(&u32::MAX.to_be_bytes());
        many.extend_from_slice(&0u32.to_be_bytes());
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (b"GET / HTTP/1.1\r\n".to_vec(), ProtocolError::BadMagic(*b"GET ")),
            (oversized, ProtocolError::HeaderTooLarge { len: u32::MAX as u64 }),
            (version, ProtocolError::Version { got: 7 }),
            (many, ProtocolError::TooManyFds { count: u32::MAX as u64 }),
        ];
        for (i, (bytes, want)) in cases.into_iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("g{i}.sock"));
            let old = fake_old(&path, bytes);
            match receive(&path, T).await {
                Err(HandoverError::Protocol { source, .. }) => assert_eq!(source, want),
                other => panic!("case {i}: expected {want:?}, got {other:?}"),
            }
            old.join().unwrap();
        }
    }

    #[tokio::test]
    async fn header_cut_short_is_a_clean_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.sock");
        let header = encode_header(&["admin"], b"state").unwrap();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let old = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(&header[..header.len() - 2]).unwrap();
        });
        match receive(&path, T).await {
            Err(HandoverError::Protocol { source: ProtocolError::Closed { .. }, .. }) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
        old.join().unwrap();
    }

    #[tokio::test]
    async fn fewer_descriptors_than_announced_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("few.sock");
        let header = encode_header(&["a", "b"], b"").unwrap();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let sock = tcp_listener();
        let old = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(&header).unwrap();
            // Announces two, carries one.
            s.send_with_fd(&[TAG_FDS, 0, 2], &[sock.as_raw_fd()]).unwrap();
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            reply
        });
        match receive(&path, T).await {
            Err(HandoverError::Protocol {
                source: ProtocolError::BatchCount { expected: 2, announced: 2, received: 1 },
                ..
            }) => {}
            other => panic!("expected BatchCount, got {other:?}"),
        }
        let reply = old.join().unwrap();
        assert_eq!(reply.first(), Some(&TAG_FAILED), "the old process is told why");
    }

    #[tokio::test]
    async fn garbage_reply_from_the_successor_is_a_clean_error() {
        for (reply, want) in [
            (vec![b'X'], ProtocolError::BadTag(b'X')),
            (vec![TAG_FAILED, 0xff, 0xff], ProtocolError::ReasonTooLong { len: 0xffff }),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("r.sock");
            let offer = Offer::bind(&path).unwrap();
            let new = async {
                let mut s = UnixStream::connect(&path).await.unwrap();
                s.write_all(&reply).await.unwrap();
                s
            };
            let (res, _s) = tokio::join!(offer.hand_over(&[], b"", T), new);
            match res {
                Err(HandoverError::Protocol { source, .. }) => assert_eq!(source, want),
                other => panic!("expected {want:?}, got {other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn offer_gives_up_when_no_successor_connects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let offer = Offer::bind(&path).unwrap();
        let start = Instant::now();
        match offer.hand_over(&[], b"", Duration::from_secs(60)).await {
            Err(HandoverError::Timeout { stage, .. }) => assert!(stage.contains("connect"), "{stage}"),
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(start.elapsed() >= Duration::from_secs(60));
        assert!(!path.exists(), "a dropped offer removes its socket file");
    }

    #[tokio::test]
    async fn offer_gives_up_when_ready_never_comes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let l = tcp_listener();
        let offer = Offer::bind(&path).unwrap();
        let fd = l.as_fd().try_clone_to_owned().unwrap();
        let old = tokio::spawn(async move {
            let start = Instant::now();
            let r = offer.hand_over(&[("admin", fd.as_fd())], b"", Duration::from_secs(600)).await;
            (r, start.elapsed())
        });
        // Real time until everything is received; then virtual time, so the 600 s deadline
        // passes at once while the successor holds `Ready`.
        let (_inh, _, ready) = receive(&path, T).await.unwrap();
        tokio::time::pause();
        let (r, elapsed) = old.await.unwrap();
        match r {
            Err(HandoverError::Timeout { stage, .. }) => assert!(stage.contains("READY"), "{stage}"),
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(elapsed >= Duration::from_secs(600));
        drop(ready);
    }

    #[tokio::test(start_paused = true)]
    async fn receive_gives_up_when_the_old_process_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        // Listening, never accepting: connect completes through the backlog, then silence.
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        match receive(&path, Duration::from_secs(45)).await {
            Err(HandoverError::Timeout { stage, .. }) => assert!(stage.contains("header"), "{stage}"),
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(start.elapsed() >= Duration::from_secs(45));
    }

    #[tokio::test]
    async fn second_offer_on_a_path_is_busy_and_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        // Left by a process that died: a socket file nobody listens on, no lock held.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let first = Offer::bind(&path).unwrap();
        match Offer::bind(&path) {
            Err(HandoverError::Busy { .. }) => {}
            other => panic!("expected Busy, got {other:?}"),
        }
        assert!(path.exists(), "the refused offer leaves the live one alone");
        drop(first);
        assert!(!path.exists());
        // Not a socket: never replaced.
        fs::write(&path, b"precious").unwrap();
        assert!(matches!(Offer::bind(&path), Err(HandoverError::Io { .. })));
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn invalid_names_and_state_are_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let l = tcp_listener();
        let offer = Offer::bind(&path).unwrap();
        let r = offer.hand_over(&[("listener:rw", l.as_fd())], b"", T).await;
        assert!(matches!(r, Err(HandoverError::Invalid(ProtocolError::BadName { index: 0 }))), "{r:?}");
        let offer = Offer::bind(&path).unwrap();
        let big = vec![0u8; MAX_STATE_LEN + 1];
        let r = offer.hand_over(&[], &big, T).await;
        assert!(matches!(r, Err(HandoverError::Invalid(ProtocolError::StateTooLarge { .. }))), "{r:?}");
    }

    #[test]
    fn exe_is_taken_from_argv0_before_proc_self_exe() {
        let cwd = Path::new("/srv");
        let exe = Some(PathBuf::from("/usr/lib/pgfront/pgfront-1.2"));
        let deleted = Some(PathBuf::from("/usr/bin/pgfront (deleted)"));
        assert_eq!(
            choose_exe(Some(OsStr::new("/usr/bin/pgfront")), Some(cwd), exe.clone()),
            Some(PathBuf::from("/usr/bin/pgfront"))
        );
        assert_eq!(
            choose_exe(Some(OsStr::new("./target/pgfront")), Some(cwd), exe.clone()),
            Some(PathBuf::from("/srv/./target/pgfront"))
        );
        assert_eq!(choose_exe(Some(OsStr::new("pgfront")), Some(cwd), exe.clone()), exe);
        assert_eq!(choose_exe(Some(OsStr::new("pgfront")), Some(cwd), deleted), None);
        assert_eq!(choose_exe(None, None, None), None);
    }

    #[tokio::test]
    async fn successor_gets_args_cwd_environment_and_the_handover_path() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = dir.path().join("fake-pgfront");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\n{{ echo \"args=$*\"; echo \"cwd=$(pwd)\"; echo \"handover=$PGFRONT_HANDOVER\"; \
                 echo \"path_kept=${{PATH:+yes}}\"; echo \"listen=${{LISTEN_FDS:-none}}\"; }} > {}\n",
                out.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let args = [OsString::from("proxy"), OsString::from("-c"), OsString::from("/etc/pgfront/pgfront.toml")];
        let hp = dir.path().join("handover.sock");
        let cmd = successor_command(&script, &args, &hp);
        // Only these variables are touched: NOTIFY_SOCKET and the rest are inherited as they are.
        let mut touched: Vec<_> = cmd.as_std().get_envs().map(|(k, _)| k.to_owned()).collect();
        touched.sort();
        assert_eq!(touched, ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID", HANDOVER_ENV]);
        let status = spawn_successor(&script, &args, &hp).unwrap().wait().await.unwrap();
        assert!(status.success());
        let text = fs::read_to_string(&out).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert!(text.contains("args=proxy -c /etc/pgfront/pgfront.toml\n"), "{text}");
        assert!(text.contains(&format!("cwd={}\n", cwd.display())), "{text}");
        assert!(text.contains(&format!("handover={}\n", hp.display())), "{text}");
        assert!(text.contains("path_kept=yes\n"), "{text}");
        assert!(text.contains("listen=none\n"), "{text}");
    }

    proptest! {
        #[test]
        fn header_round_trips(
            names in proptest::collection::vec("[ -9;-~]{0,40}", 0..20),
            state in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let bytes = encode_header(&refs, &state).unwrap();
            let mut pre = [0u8; PREAMBLE_LEN];
            pre.copy_from_slice(&bytes[..PREAMBLE_LEN]);
            let len = decode_preamble(&pre).unwrap();
            prop_assert_eq!(len, bytes.len() - PREAMBLE_LEN);
            let (n, s) = decode_header(&bytes[PREAMBLE_LEN..]).unwrap();
            prop_assert_eq!(n, names);
            prop_assert_eq!(s, state);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_header(&bytes);
            if bytes.len() >= PREAMBLE_LEN {
                let mut pre = [0u8; PREAMBLE_LEN];
                pre.copy_from_slice(&bytes[..PREAMBLE_LEN]);
                let _ = decode_preamble(&pre);
            }
        }
    }

    // ---- systemd socket activation, in a child process (own pid, own environment, fds 3 and 4).

    const CHILD_MODE: &str = "PGFRONT_TEST_CHILD_MODE";

    /// Runs the ignored test `child_from_systemd` of this binary in a child with `fds` at 3, 4, …
    /// and `env`; with `listen_pid_self`, LISTEN_PID is the child's own pid (set by `sh`, which
    /// then execs the test binary under the same pid).
    fn run_child(mode: &str, fds: &[BorrowedFd<'_>], env: &[(&str, &str)], listen_pid_self: bool) -> String {
        let exe = std::env::current_exe().unwrap();
        // Out of the way of 3, 4, …: duplicates at >= 100 (CLOEXEC, so no other child gets them).
        let high: Vec<OwnedFd> = fds
            .iter()
            .map(|fd| {
                // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that we own.
                let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                assert!(n >= 100);
                unsafe { OwnedFd::from_raw_fd(n) }
            })
            .collect();
        let raws: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
        let test_args =
            ["--exact", "handover::tests::child_from_systemd", "--ignored", "--test-threads=1", "--nocapture"];
        let mut cmd = if listen_pid_self {
            let mut c = std::process::Command::new("/bin/sh");
            c.arg("-c").arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"").arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        cmd.args(test_args).env(CHILD_MODE, mode).envs(env.iter().copied());
        // SAFETY: only dup2, which is async-signal-safe, between fork and exec; the sources are
        // at >= 100, so no target (3, 4, …) overwrites a source.
        unsafe {
            cmd.pre_exec(move || {
                for (i, &fd) in raws.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as RawFd) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "child ({mode}) failed:\n{text}");
        // A filter that matched nothing would also exit 0.
        assert!(text.contains("1 passed"), "child ({mode}) did not run its test:\n{text}");
        drop(high);
        text
    }

    #[test]
    fn systemd_socket_activation_is_taken_with_names() {
        let rw = tcp_listener();
        let admin = tcp_listener();
        let addrs = format!("{},{}", rw.local_addr().unwrap(), admin.local_addr().unwrap());
        let env =
            [("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "listener.rw:admin"), ("PGFRONT_TEST_ADDRS", addrs.as_str())];
        run_child("ours", &[rw.as_fd(), admin.as_fd()], &env, true);
    }

    #[test]
    fn systemd_sockets_for_another_pid_or_not_sockets_are_refused() {
        let rw = tcp_listener();
        let env = [("LISTEN_PID", "1"), ("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "listener.rw")];
        run_child("other-pid", &[rw.as_fd()], &env, false);
        let env = [("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "a:b")];
        run_child("bad-names", &[rw.as_fd()], &env, true);
        let file = fs::File::open("/dev/null").unwrap();
        let env = [("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "listener.rw")];
        run_child("not-socket", &[file.as_fd()], &env, true);
    }

    /// Not a test on its own: the child side of the tests above (does nothing without them).
    #[test]
    #[ignore = "run by systemd_* tests in a child process"]
    fn child_from_systemd() {
        let Ok(mode) = std::env::var(CHILD_MODE) else { return };
        // SAFETY: --test-threads=1: this is the only thread touching the environment.
        let got = unsafe { from_systemd() };
        for v in LISTEN_VARS {
            assert!(std::env::var_os(v).is_none(), "{v} must be unset");
        }
        match mode.as_str() {
            "ours" => {
                let got = got.unwrap();
                let names: Vec<_> = got.iter().map(|s| s.name.as_str()).collect();
                assert_eq!(names, ["listener.rw", "admin"]);
                let want = std::env::var("PGFRONT_TEST_ADDRS").unwrap();
                let mut addrs = Vec::new();
                for (i, s) in got.into_iter().enumerate() {
                    assert_eq!(s.fd.as_raw_fd(), 3 + i as RawFd);
                    assert!(cloexec(s.fd.as_fd()), "fd {} must be CLOEXEC", 3 + i);
                    addrs.push(std::net::TcpListener::from(s.fd).local_addr().unwrap().to_string());
                }
                assert_eq!(addrs.join(","), want);
            }
            "other-pid" => assert!(got.unwrap().is_empty()),
            "bad-names" => assert!(matches!(got, Err(HandoverError::Systemd(_))), "{got:?}"),
            "not-socket" => assert!(matches!(got, Err(HandoverError::NotASocket { fd: 3, .. })), "{got:?}"),
            other => panic!("unknown mode {other}"),
        }
    }
}
