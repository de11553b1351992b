//! What of WASI 0.2 a plugin gets, through `wasmtime-wasi`:
//! - `wasi:cli` stdout and stderr: each line goes to cllm's log, tagged with the plugin's file
//!   name, at most [`LINES_PER_SECOND`] lines a second (bursts of [`LINE_BURST`]) and
//!   [`MAX_LINE_BYTES`] bytes a line; what is over is dropped and the drop counted in the next
//!   line that passes;
//! - `wasi:clocks` (monotonic and wall clock) and `wasi:random`.
//!
//! The rest of WASI 0.2 is linked, so that components built by ordinary toolchains (Rust's
//! `wasm32-wasip2` standard library, componentize-py's Python runtime) load, but reaches
//! nothing: no environment variables, no arguments, an empty stdin, no filesystem preopens,
//! no network (every socket address is denied, name lookup is off). `exit` ends the call with
//! a trap, a fault like any other. Waiting on a clock (`sleep`) traps too: host calls cannot
//! be interrupted by the call deadline, so a plugin may not block in one.
//!
//! A component that imports anything else (another WASI proposal such as `wasi:http`, or a
//! package of its own) is refused at load, naming the import; so is one importing what the
//! operator lists in `plugins.refused_imports` (e.g. `wasi:filesystem`, `wasi:sockets`, for a
//! server that wants no plugin even linked to them: Python components always import both, so
//! such a server refuses them).

use super::engine::PluginData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// Import prefixes a plugin may have: cllm's own package and the WASI 0.2 packages linked.
const ALLOWED_IMPORTS: &[&str] = &[
    "cllm:policy/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:io/",
    "wasi:random/",
    "wasi:filesystem/",
    "wasi:sockets/",
];

/// Log lines a plugin may write per second, on average.
pub const LINES_PER_SECOND: f64 = 20.0;
/// Log lines a plugin may write at once after a quiet spell.
pub const LINE_BURST: f64 = 50.0;
/// Longer lines are cut (and marked) at this many bytes.
pub const MAX_LINE_BYTES: usize = 2048;

/// Why a component with `imports` is refused, `None` when all are offered: an import cllm does
/// not offer at all, or one the operator refuses (`plugins.refused_imports`: prefixes such as
/// `wasi:filesystem` or `wasi:sockets`).
pub fn refused_imports(imports: &[String], operator_refused: &[String]) -> Option<String> {
    let names = || imports.iter().map(String::as_str);
    // A WASI 0.3 component (wasm32-wasip3) names the same packages at another version.
    let other_wasi = |name: &str| name.starts_with("wasi:") && !is_wasi_0_2(name);
    let foreign: Vec<&str> = names()
        .filter(|name| !ALLOWED_IMPORTS.iter().any(|p| name.starts_with(p)) || other_wasi(name))
        .collect();
    if foreign.iter().any(|name| other_wasi(name)) {
        return Some(format!(
            "imports {}: cllm offers plugins WASI 0.2 only (build for wasm32-wasip2)",
            foreign.join(", ")
        ));
    }
    if !foreign.is_empty() {
        return Some(format!(
            "imports {}, which cllm does not offer plugins (they get cllm:policy and WASI 0.2: \
             cli, clocks, io, random; filesystem and sockets reach nothing)",
            foreign.join(", ")
        ));
    }
    let refused: Vec<&str> = names()
        .filter(|name| {
            operator_refused
                .iter()
                .any(|p| name.starts_with(p.as_str()))
        })
        .collect();
    (!refused.is_empty()).then(|| {
        format!(
            "imports {}, which this server refuses (plugins.refused_imports)",
            refused.join(", ")
        )
    })
}

/// Whether a WASI import names version 0.2 (`wasi:io/streams@0.2.3`), or no version at all.
fn is_wasi_0_2(name: &str) -> bool {
    name.split_once('@')
        .is_none_or(|(_, version)| version.starts_with("0.2."))
}

/// Adds WASI 0.2 to `linker`, with clock waits turned into traps.
pub fn add_to_linker(linker: &mut Linker<PluginData>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    // Replace the two ways to get a clock pollable: a plugin that sleeps would block its
    // caller in a host call the epoch deadline cannot interrupt.
    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    let refuse = |what: &str| {
        wasmtime::format_err!(
            "{what}: plugins may not sleep or wait (the call would outlive its deadline)"
        )
    };
    clock.func_wrap(
        "subscribe-duration",
        move |_store, (_ns,): (u64,)| -> wasmtime::Result<(Resource<DynPollable>,)> {
            Err(refuse("monotonic-clock.subscribe-duration"))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        move |_store, (_at,): (u64,)| -> wasmtime::Result<(Resource<DynPollable>,)> {
            Err(refuse("monotonic-clock.subscribe-instant"))
        },
    )?;
    shadow_output_streams(linker)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// wasmtime-wasi's sync linker runs an output stream's blocking methods and its destructor
/// by blocking on a tokio runtime, which panics on a tokio worker thread; every plugin that
/// prints would then need its calls moved off the workers. The only output streams a plugin
/// can hold are its stdout and stderr, which go to the log and never wait (no files are
/// open, no socket can connect), so these replacements do the same work without tokio, and
/// calls into plugins that use nothing else of the kind ([`waits_on_tokio`]) can run inline.
fn shadow_output_streams(linker: &mut Linker<PluginData>) -> wasmtime::Result<()> {
    use wasmtime::component::ResourceType;
    use wasmtime_wasi::p2::bindings::sync::io::streams::StreamError as WitStreamError;
    use wasmtime_wasi::p2::DynOutputStream;
    type Written = wasmtime::Result<(Result<(), WitStreamError>,)>;
    let mut streams = linker.instance("wasi:io/streams@0.2.12")?;
    streams.resource(
        "output-stream",
        ResourceType::host::<DynOutputStream>(),
        |mut store, rep| {
            let table = &mut store.data_mut().table;
            table.delete(Resource::<DynOutputStream>::new_own(rep))?;
            Ok(())
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-and-flush",
        |mut store, (stream, bytes): (Resource<DynOutputStream>, Vec<u8>)| -> Written {
            if bytes.len() > 4096 {
                wasmtime::bail!(
                    "Buffer too large for blocking-write-and-flush (expected at most 4096)"
                );
            }
            write_now(&mut store.data_mut().table, &stream, Some(bytes))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-flush",
        |mut store, (stream,): (Resource<DynOutputStream>,)| -> Written {
            write_now(&mut store.data_mut().table, &stream, None)
        },
    )?;
    shadow_input_streams(&mut streams)?;
    shadow_pollables(linker)
}

/// The input side: a plugin's only input stream is its empty stdin, which never waits.
fn shadow_input_streams(
    streams: &mut wasmtime::component::LinkerInstance<'_, PluginData>,
) -> wasmtime::Result<()> {
    use wasmtime::component::ResourceType;
    use wasmtime_wasi::p2::bindings::io::streams::HostInputStream;
    use wasmtime_wasi::p2::bindings::sync::io::streams::StreamError as WitStreamError;
    use wasmtime_wasi::p2::DynInputStream;
    streams.resource(
        "input-stream",
        ResourceType::host::<DynInputStream>(),
        |mut store, rep| {
            let table = &mut store.data_mut().table;
            table.delete(Resource::<DynInputStream>::new_own(rep))?;
            Ok(())
        },
    )?;
    type Read = wasmtime::Result<(Result<Vec<u8>, WitStreamError>,)>;
    streams.func_wrap(
        "[method]input-stream.blocking-read",
        |mut store, (stream, len): (Resource<DynInputStream>, u64)| -> Read {
            let table = &mut store.data_mut().table;
            let read = now_or_trap(
                "input-stream.blocking-read",
                table.blocking_read(stream, len),
            )?;
            to_wit(table, read)
        },
    )?;
    type Skipped = wasmtime::Result<(Result<u64, WitStreamError>,)>;
    streams.func_wrap(
        "[method]input-stream.blocking-skip",
        |mut store, (stream, len): (Resource<DynInputStream>, u64)| -> Skipped {
            let table = &mut store.data_mut().table;
            let skipped = now_or_trap(
                "input-stream.blocking-skip",
                table.blocking_skip(stream, len),
            )?;
            to_wit(table, skipped)
        },
    )?;
    Ok(())
}

/// Waiting on pollables: every pollable a plugin can hold (its log streams, its empty stdin;
/// clock waits are refused above) is always ready, so these answer at once, and a pollable
/// that is not ready is a fault rather than a wait.
fn shadow_pollables(linker: &mut Linker<PluginData>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::io::poll::{Host, HostPollable};
    let mut poll = linker.instance("wasi:io/poll@0.2.12")?;
    poll.func_wrap(
        "poll",
        |mut store, (pollables,): (Vec<Resource<DynPollable>>,)| -> wasmtime::Result<(Vec<u32>,)> {
            let table = &mut store.data_mut().table;
            Ok((now_or_trap("poll", table.poll(pollables))??,))
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |mut store, (pollable,): (Resource<DynPollable>,)| -> wasmtime::Result<()> {
            let table = &mut store.data_mut().table;
            now_or_trap("pollable.block", table.block(pollable))?
        },
    )?;
    poll.func_wrap(
        "[method]pollable.ready",
        |mut store, (pollable,): (Resource<DynPollable>,)| -> wasmtime::Result<(bool,)> {
            let table = &mut store.data_mut().table;
            Ok((now_or_trap("pollable.ready", table.ready(pollable))??,))
        },
    )?;
    Ok(())
}

/// Polls `work` once, without a runtime: its result if it is done, else a fault (a plugin
/// call may not wait).
fn now_or_trap<F: std::future::Future>(what: &str, work: F) -> wasmtime::Result<F::Output> {
    let mut work = std::pin::pin!(work);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match work.as_mut().poll(&mut cx) {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => Err(wasmtime::format_err!(
            "{what}: plugins may not wait (the call would outlive its deadline)"
        )),
    }
}

/// Writes `bytes` (if any) to `stream` and flushes it, without waiting: a log stream is
/// always ready.
fn write_now(
    table: &mut wasmtime::component::ResourceTable,
    stream: &Resource<wasmtime_wasi::p2::DynOutputStream>,
    bytes: Option<Vec<u8>>,
) -> wasmtime::Result<(Result<(), wasmtime_wasi::p2::bindings::sync::io::streams::StreamError>,)> {
    let out = table.get_mut(stream)?;
    let written = match bytes {
        Some(bytes) => out.write(bytes.into()).and_then(|()| out.flush()),
        None => out.flush(),
    };
    to_wit(table, written)
}

/// A stream operation's outcome as its WIT function returns it: a closed or failed stream is
/// the plugin's to handle (an error value); a trap stays a trap.
fn to_wit<T>(
    table: &mut wasmtime::component::ResourceTable,
    outcome: Result<T, StreamError>,
) -> wasmtime::Result<(Result<T, wasmtime_wasi::p2::bindings::sync::io::streams::StreamError>,)> {
    use wasmtime_wasi::p2::bindings::sync::io::streams::Host;
    match outcome {
        Ok(value) => Ok((Ok(value),)),
        Err(e) => Ok((Err(table.convert_stream_error(e)?),)),
    }
}

/// The WASI imports that still block on a tokio runtime in wasmtime-wasi's sync linker
/// after [`shadow_output_streams`] (files, sockets, and two output-stream calls no plugin
/// toolchain emits for printing), as (interface prefix, item name); an empty name stands for
/// the whole interface.
const WAITS_ON_TOKIO: &[(&str, &str)] = &[
    ("wasi:io/streams@", "[method]output-stream.blocking-splice"),
    (
        "wasi:io/streams@",
        "[method]output-stream.blocking-write-zeroes-and-flush",
    ),
    ("wasi:filesystem/", ""),
    ("wasi:sockets/", ""),
];

/// The first import of a plugin with these imports (interface name, the items it imports
/// from it) that may block on a tokio runtime, as `interface/item`: such a plugin must be
/// called off the async workers. `None`: its calls may run inline.
pub fn waits_on_tokio<'a>(
    imports: impl IntoIterator<Item = (&'a str, Vec<String>)>,
) -> Option<String> {
    imports.into_iter().find_map(|(interface, items)| {
        WAITS_ON_TOKIO.iter().find_map(|(prefix, item)| {
            if !interface.starts_with(prefix) {
                return None;
            }
            if item.is_empty() {
                return Some(interface.to_string());
            }
            items
                .iter()
                .any(|i| i == item)
                .then(|| format!("{interface}/{item}"))
        })
    })
}

/// The WASI context of one instance of the plugin whose output goes to `log`.
pub fn context(log: &PluginLog) -> WasiCtx {
    let mut builder = WasiCtxBuilder::new();
    builder
        .stdout(log.stream(Stream::Stdout))
        .stderr(log.stream(Stream::Stderr))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    builder.build()
}

/// Which of the plugin's output streams a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A plugin's stdout and stderr, turned into log lines under one rate limit; shared by every
/// instance of the plugin.
#[derive(Clone)]
pub struct PluginLog {
    state: Arc<Mutex<LogState>>,
}

struct LogState {
    file: String,
    /// Bytes of an unfinished line, per stream.
    partial: [Vec<u8>; 2],
    /// Token bucket: lines that may be written now.
    tokens: f64,
    refilled: Instant,
    /// Lines dropped since the last line that passed (reported with it).
    dropped: u64,
    dropped_total: u64,
    /// Lines written to the log (for tests and `cllm plugin check`).
    written: u64,
}

impl PluginLog {
    pub fn new(file: &str) -> PluginLog {
        PluginLog {
            state: Arc::new(Mutex::new(LogState {
                file: file.to_string(),
                partial: [Vec::new(), Vec::new()],
                tokens: LINE_BURST,
                refilled: Instant::now(),
                dropped: 0,
                dropped_total: 0,
                written: 0,
            })),
        }
    }

    fn stream(&self, stream: Stream) -> LogStream {
        LogStream {
            log: self.clone(),
            stream,
        }
    }

    /// Lines logged and lines dropped by the rate limit so far.
    pub fn counts(&self) -> (u64, u64) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.written, state.dropped_total)
    }

    /// Takes `bytes` written to `stream`: every completed line is logged (or dropped).
    fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut rest = bytes;
        while !rest.is_empty() {
            let newline = rest.iter().position(|&b| b == b'\n');
            let take = newline.map_or(rest.len(), |i| i + 1);
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let partial = &mut state.partial[stream as usize];
            let room = (MAX_LINE_BYTES + 1).saturating_sub(partial.len());
            partial.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if newline.is_some() {
                let mut line = std::mem::take(partial);
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                state.emit(stream, line);
            }
        }
    }
}

impl LogState {
    fn emit(&mut self, stream: Stream, mut line: Vec<u8>) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * LINES_PER_SECOND).min(LINE_BURST);
        self.refilled = now;
        if self.tokens < 1.0 {
            self.dropped += 1;
            self.dropped_total += 1;
            return;
        }
        self.tokens -= 1.0;
        self.written += 1;
        let cut = line.len() > MAX_LINE_BYTES;
        line.truncate(MAX_LINE_BYTES);
        let mut text = String::from_utf8_lossy(&line).into_owned();
        if cut {
            text.push_str(" [line cut]");
        }
        let plugin = self.file.as_str();
        let dropped = std::mem::take(&mut self.dropped);
        match stream {
            Stream::Stdout if dropped > 0 => {
                tracing::info!(plugin = %plugin, stream = "stdout", dropped_lines = dropped, "{text}")
            }
            Stream::Stdout => tracing::info!(plugin = %plugin, stream = "stdout", "{text}"),
            Stream::Stderr if dropped > 0 => {
                tracing::warn!(plugin = %plugin, stream = "stderr", dropped_lines = dropped, "{text}")
            }
            Stream::Stderr => tracing::warn!(plugin = %plugin, stream = "stderr", "{text}"),
        }
    }
}

/// One WASI output stream handle onto a [`PluginLog`]: always ready, never full, never
/// failing (what the rate limit drops is dropped silently for the guest).
struct LogStream {
    log: PluginLog,
    stream: Stream,
}

/// What one `write` may carry (the guest asks `check-write` first).
const WRITE_PERMIT: usize = 64 << 10;

#[wasmtime_wasi::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.log.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.log.stream(self.stream))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.log.stream(self.stream))
    }
}

/// For WASI 0.3's streams, which cllm does not link; written the same way.
impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.log.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_sockets_and_two_stream_calls_keep_a_plugin_off_the_workers() {
        let items = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let printing = vec![
            (
                "wasi:io/poll@0.2.6",
                items(&["pollable", "[method]pollable.block", "poll"]),
            ),
            (
                "wasi:io/streams@0.2.6",
                items(&[
                    "output-stream",
                    "[method]output-stream.blocking-write-and-flush",
                ]),
            ),
            ("wasi:cli/stdout@0.2.6", items(&["get-stdout"])),
        ];
        assert_eq!(waits_on_tokio(printing.clone()), None);
        let mut with_files = printing.clone();
        with_files.push(("wasi:filesystem/types@0.2.6", items(&["descriptor"])));
        assert_eq!(
            waits_on_tokio(with_files).as_deref(),
            Some("wasi:filesystem/types@0.2.6")
        );
        let splice = vec![(
            "wasi:io/streams@0.2.0",
            items(&["[method]output-stream.blocking-splice"]),
        )];
        assert_eq!(
            waits_on_tokio(splice).as_deref(),
            Some("wasi:io/streams@0.2.0/[method]output-stream.blocking-splice")
        );
    }

    #[test]
    fn lines_are_split_cut_and_rate_limited() {
        let log = PluginLog::new("t.wasm");
        log.write(Stream::Stdout, b"one\ntw");
        assert_eq!(log.counts(), (1, 0));
        log.write(Stream::Stderr, b"err\n");
        log.write(Stream::Stdout, b"o\n");
        assert_eq!(log.counts(), (3, 0));
        // A line longer than the cap still counts as one line.
        log.write(Stream::Stdout, &vec![b'x'; 3 * MAX_LINE_BYTES]);
        log.write(Stream::Stdout, b"\n");
        assert_eq!(log.counts(), (4, 0));
        {
            let state = log.state.lock().expect("lock");
            assert!(state.partial.iter().all(Vec::is_empty));
        }
        // A burst past the bucket is dropped, not logged.
        log.write(Stream::Stdout, "x\n".repeat(200).as_bytes());
        let (written, dropped) = log.counts();
        assert!(written < 4 + 60, "{written}");
        assert!(dropped > 100, "{dropped}");
    }

    #[test]
    fn foreign_and_operator_refused_imports_are_named() {
        let ok: Vec<String> = ["cllm:policy/host@0.1.0", "wasi:cli/stdout@0.2.6"]
            .map(String::from)
            .to_vec();
        assert_eq!(refused_imports(&ok, &[]), None);
        let with = |name: &str| [ok.clone(), vec![name.to_string()]].concat();
        let message =
            refused_imports(&with("wasi:http/outgoing-handler@0.2.0"), &[]).expect("refused");
        assert!(
            message.contains("wasi:http/outgoing-handler@0.2.0"),
            "{message}"
        );
        assert!(!message.contains("wasi:cli/stdout"), "{message}");
        let fs = with("wasi:filesystem/types@0.2.6");
        assert_eq!(refused_imports(&fs, &[]), None, "inert by default");
        let strict = ["wasi:filesystem".to_string(), "wasi:sockets".to_string()];
        let message = refused_imports(&fs, &strict).expect("refused when asked");
        assert!(
            message.contains("wasi:filesystem/types@0.2.6,")
                || message.contains("wasi:filesystem/types@0.2.6 "),
            "{message}"
        );
        assert!(message.contains("plugins.refused_imports"), "{message}");
        let p3 = with("wasi:cli/environment@0.3.0-rc-2025-09-16");
        let message = refused_imports(&p3, &[]).expect("refused");
        assert!(message.contains("wasm32-wasip2"), "{message}");
        assert!(message.contains("wasi:cli/environment@0.3.0"), "{message}");
    }
}
