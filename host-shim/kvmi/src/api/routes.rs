//! The routes: one request in, one status and JSON body out (docs/api.md).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::backend::{AddTarget, Backend, Role};
use super::error::ApiError;
use super::http::Request;

/// How long the vCPUs of a target get to park on `PUT /vm/pause`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `DELETE /vm/targets/{id}` waits for the target to end and free its slot.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

/// A dump under way.
struct DumpJob {
    path: String,
    format: kvmi_dump::Format,
    live: bool,
    started: Instant,
    progress: kvmi_dump::Progress,
}

/// The server's state behind the routes: the backend, which targets the API paused, and the
/// dumps under way.
pub struct Api {
    backend: Arc<dyn Backend>,
    paused: Mutex<BTreeSet<u64>>,
    dumps: Mutex<BTreeMap<u64, Arc<DumpJob>>>,
}

/// A lock that a panicked holder did not make unusable (the data are plain sets and maps).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request body of type `T`; an empty body counts as `{}`.
fn body<T: DeserializeOwned>(req: &Request) -> Result<T, ApiError> {
    let bytes: &[u8] = if req.body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))
}

/// The body of pause and resume.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Which {
    target: Option<u64>,
}

/// The body of `PUT /vm/dump`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DumpBody {
    target: Option<u64>,
    path: String,
    format: kvmi_dump::Format,
    #[serde(default)]
    live: bool,
}

/// Removes a dump's job when the dump ends, however it ends.
struct JobGuard<'a> {
    dumps: &'a Mutex<BTreeMap<u64, Arc<DumpJob>>>,
    target: u64,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        lock(self.dumps).remove(&self.target);
    }
}

impl Api {
    /// Routes over `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Api {
        Api {
            backend,
            paused: Mutex::default(),
            dumps: Mutex::default(),
        }
    }

    /// Answers one request: the status and its JSON body.
    pub fn handle(&self, req: &Request) -> Result<(u16, Value), ApiError> {
        let m = req.method.as_str();
        let not_allowed = |allowed: &'static str| {
            Err(ApiError::MethodNotAllowed {
                method: req.method.clone(),
                path: req.path.clone(),
                allowed,
            })
        };
        match req.path.trim_end_matches('/') {
            "/vm/info" => match m {
                "GET" => Ok((200, self.info())),
                _ => not_allowed("GET"),
            },
            "/vm/stats" => match m {
                "GET" => Ok((200, json!({ "targets": self.backend.stats() }))),
                _ => not_allowed("GET"),
            },
            "/vm/pause" => match m {
                "PUT" => self.pause(body(req)?),
                _ => not_allowed("PUT"),
            },
            "/vm/resume" => match m {
                "PUT" => self.resume(body(req)?),
                _ => not_allowed("PUT"),
            },
            "/vm/dump" => match m {
                "PUT" => self.dump(body(req)?),
                _ => not_allowed("PUT"),
            },
            "/vm/dump/progress" => match m {
                "GET" => Ok((200, self.progress())),
                _ => not_allowed("GET"),
            },
            "/vm/targets" => match m {
                "PUT" => {
                    let target: AddTarget = body(req)?;
                    let id = self.backend.add_target(&target)?;
                    Ok((201, json!({ "id": id, "name": target.name })))
                }
                _ => not_allowed("PUT"),
            },
            path => match path.strip_prefix("/vm/targets/") {
                Some(id) => {
                    let id: u64 = id
                        .parse()
                        .map_err(|_| ApiError::NotFound(format!("no target `{id}`")))?;
                    match m {
                        "DELETE" => self.remove(id),
                        _ => not_allowed("DELETE"),
                    }
                }
                None => Err(ApiError::NotFound(format!("no route {path}"))),
            },
        }
    }

    fn info(&self) -> Value {
        let paused = lock(&self.paused).clone();
        let vms: Vec<Value> = self
            .backend
            .vms()
            .into_iter()
            .map(|vm| {
                let state = match &vm.handle {
                    Some(h) if !h.has_ended() => {
                        if vm.role == Role::Target && paused.contains(&vm.id) {
                            "paused"
                        } else {
                            "running"
                        }
                    }
                    _ => "ended",
                };
                let mut v = json!({
                    "id": vm.id,
                    "name": vm.name,
                    "role": vm.role,
                    "vcpus": vm.vcpus,
                    "memory_mib": vm.memory_bytes >> 20,
                    "state": state,
                });
                if let Some(profile) = vm.profile {
                    v["profile"] = json!(profile);
                }
                if let Some(kvmi) = vm.kvmi {
                    v["kvmi"] = json!(kvmi);
                }
                if let Some(outcome) = vm.outcome {
                    v["outcome"] = json!(outcome);
                }
                v
            })
            .collect();
        json!({ "vms": vms })
    }

    /// The targets a pause or resume is about: the one named, or every running target.
    fn which(&self, which: &Which) -> Result<Vec<(u64, vmm::VmHandle)>, ApiError> {
        match which.target {
            Some(id) => Ok(vec![(id, self.backend.target(id)?)]),
            None => {
                let all: Vec<_> = self
                    .backend
                    .running_targets()
                    .into_iter()
                    .filter_map(|id| Some((id, self.backend.target(id).ok()?)))
                    .collect();
                if all.is_empty() {
                    return Err(ApiError::Conflict("no target is running".into()));
                }
                Ok(all)
            }
        }
    }

    fn pause(&self, which: Which) -> Result<(u16, Value), ApiError> {
        let targets = self.which(&which)?;
        let mut done = Vec::new();
        for (id, handle) in targets {
            if !handle.pause_all(PAUSE_TIMEOUT) {
                handle.resume_all();
                for (_, h) in &done {
                    let h: &vmm::VmHandle = h;
                    h.resume_all();
                }
                let mut paused = lock(&self.paused);
                for (i, _) in &done {
                    paused.remove(i);
                }
                return Err(ApiError::Unavailable(format!(
                    "the vCPUs of target {id} did not pause within {PAUSE_TIMEOUT:?}; \
                     nothing is paused"
                )));
            }
            lock(&self.paused).insert(id);
            done.push((id, handle));
        }
        let ids: Vec<u64> = done.iter().map(|(id, _)| *id).collect();
        tracing::info!("api: paused targets {ids:?}");
        Ok((200, json!({ "paused": ids })))
    }

    fn resume(&self, which: Which) -> Result<(u16, Value), ApiError> {
        let targets = self.which(&which)?;
        let mut ids = Vec::new();
        for (id, handle) in targets {
            handle.resume_all();
            lock(&self.paused).remove(&id);
            ids.push(id);
        }
        tracing::info!("api: resumed targets {ids:?}");
        Ok((200, json!({ "resumed": ids })))
    }

    fn remove(&self, id: u64) -> Result<(u16, Value), ApiError> {
        self.backend.remove_target(id)?;
        lock(&self.paused).remove(&id);
        let deadline = Instant::now() + REMOVE_WAIT;
        loop {
            let entry = self.backend.vms().into_iter().find(|v| v.id == id);
            match entry {
                Some(vm) if vm.handle.is_none() => {
                    return Ok((
                        200,
                        json!({ "id": id, "state": "ended", "outcome": vm.outcome }),
                    ));
                }
                _ if Instant::now() >= deadline => {
                    return Ok((202, json!({ "id": id, "state": "ending" })));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn dump(&self, req: DumpBody) -> Result<(u16, Value), ApiError> {
        let path = std::path::PathBuf::from(&req.path);
        if !path.is_absolute() || req.path.contains('\0') {
            return Err(ApiError::BadRequest(format!(
                "path {:?}: an absolute file path (the server opens it)",
                req.path
            )));
        }
        let id = match req.target {
            Some(id) => id,
            None => match self.backend.running_targets()[..] {
                [id] => id,
                [] => return Err(ApiError::Conflict("no target is running".into())),
                _ => {
                    return Err(ApiError::BadRequest(
                        "several targets run: name one with \"target\"".into(),
                    ));
                }
            },
        };
        let handle = self.backend.target(id)?;
        let job = Arc::new(DumpJob {
            path: req.path.clone(),
            format: req.format,
            live: req.live,
            started: Instant::now(),
            progress: kvmi_dump::Progress::default(),
        });
        {
            let mut dumps = lock(&self.dumps);
            if dumps.contains_key(&id) {
                return Err(ApiError::Conflict(format!(
                    "a dump of target {id} is already under way"
                )));
            }
            dumps.insert(id, job.clone());
        }
        let _guard = JobGuard {
            dumps: &self.dumps,
            target: id,
        };
        let request = kvmi_dump::DumpRequest {
            path,
            format: req.format,
            live: req.live,
        };
        tracing::info!("api: dumping target {id} to {}", req.path);
        match kvmi_dump::dump(&handle, &request, &job.progress) {
            Ok(summary) => {
                let value = serde_json::to_value(&summary)
                    .map_err(|e| ApiError::Internal(format!("the summary: {e}")))?;
                Ok((200, value))
            }
            Err(e) => Err(dump_error(e)),
        }
    }

    fn progress(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let dumps: Vec<Value> = lock(&self.dumps)
            .iter()
            .map(|(id, job)| {
                json!({
                    "target": id,
                    "path": job.path,
                    "format": job.format,
                    "live": job.live,
                    "done": job.progress.done.load(Relaxed),
                    "total": job.progress.total.load(Relaxed),
                    "pass": job.progress.pass.load(Relaxed),
                    "seconds": job.started.elapsed().as_secs_f64(),
                })
            })
            .collect();
        json!({ "dumps": dumps })
    }

    /// Wakes the vCPUs of paused targets that have ended, so they see the stop (a parked vCPU
    /// sleeps until a resume), and forgets them. Called periodically by the server.
    pub fn reap_paused(&self) {
        let ids: Vec<u64> = lock(&self.paused).iter().copied().collect();
        for id in ids {
            match self.backend.target(id) {
                Ok(h) if !h.has_ended() => {}
                Ok(h) => {
                    h.resume_all();
                    lock(&self.paused).remove(&id);
                }
                Err(_) => {
                    lock(&self.paused).remove(&id);
                }
            }
        }
    }

    /// Resumes every target the API paused (the server is stopping: the run's end must not
    /// find vCPUs parked).
    pub fn resume_paused(&self) {
        let ids: Vec<u64> = std::mem::take(&mut *lock(&self.paused))
            .into_iter()
            .collect();
        for id in ids {
            if let Ok(h) = self.backend.target(id) {
                h.resume_all();
            }
        }
    }
}

/// The HTTP error of a failed dump.
fn dump_error(e: kvmi_dump::DumpError) -> ApiError {
    use kvmi_dump::DumpError;
    use std::io::ErrorKind;
    let message = e.to_string();
    match e {
        DumpError::Busy | DumpError::NotRunning => ApiError::Conflict(message),
        DumpError::PauseTimeout(_) => ApiError::Unavailable(message),
        DumpError::Layout(_) => ApiError::Internal(message),
        DumpError::Io { source, .. } => {
            let enospc = matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
            match source.kind() {
                _ if enospc => ApiError::InsufficientStorage(message),
                ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
                    ApiError::InsufficientStorage(message)
                }
                ErrorKind::NotFound
                | ErrorKind::PermissionDenied
                | ErrorKind::AlreadyExists
                | ErrorKind::InvalidInput
                | ErrorKind::IsADirectory
                | ErrorKind::NotADirectory
                | ErrorKind::ReadOnlyFilesystem
                | ErrorKind::InvalidFilename => ApiError::BadRequest(message),
                ErrorKind::Unsupported => ApiError::NotImplemented(message),
                _ => ApiError::Internal(message),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind, raw: Option<i32>) -> kvmi_dump::DumpError {
        kvmi_dump::DumpError::Io {
            what: "writing",
            path: "/x".into(),
            source: match raw {
                Some(r) => std::io::Error::from_raw_os_error(r),
                None => std::io::Error::from(kind),
            },
        }
    }

    #[test]
    fn dump_errors_map_to_statuses() {
        use kvmi_dump::DumpError;
        use std::io::ErrorKind;
        assert_eq!(dump_error(DumpError::Busy).status(), 409);
        assert_eq!(dump_error(DumpError::NotRunning).status(), 409);
        assert_eq!(
            dump_error(DumpError::PauseTimeout(Duration::from_secs(1))).status(),
            503
        );
        assert_eq!(
            dump_error(io(ErrorKind::Other, Some(libc::ENOSPC))).status(),
            507
        );
        assert_eq!(
            dump_error(io(ErrorKind::Other, Some(libc::ENOENT))).status(),
            400
        );
        assert_eq!(
            dump_error(io(ErrorKind::Other, Some(libc::EACCES))).status(),
            400
        );
        assert_eq!(dump_error(io(ErrorKind::Unsupported, None)).status(), 501);
        assert_eq!(
            dump_error(io(ErrorKind::Other, Some(libc::EIO))).status(),
            500
        );
    }
}
