//! A scriptable stand-in for Didit's HTTP API, for tests of the client itself: each test starts its own on
//! 127.0.0.1:0, tells it what each endpoint answers (any status, headers, body, or no answer at all) and reads back
//! every request it received. (Tests of the pipelines use the real emulator in `sandbox/`; this one exists to
//! produce the answers the emulator never gives.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;

/// The Didit endpoints the client calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /v3/session/{id}/share/`
    Share,
    /// `POST /v3/session/import-shared/`
    Import,
    /// `GET /v3/session/{id}/decision/`
    Decision,
    /// `GET /v3/sessions/`
    Probe,
    /// Anything else.
    Other,
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("POST", ["v3", "session", "import-shared"]) => Route::Import,
            ("POST", ["v3", "session", _, "share"]) => Route::Share,
            ("GET", ["v3", "session", _, "decision"]) => Route::Decision,
            ("GET", ["v3", "sessions"]) => Route::Probe,
            _ => Route::Other,
        }
    }
}

/// What an endpoint answers.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    hang: bool,
}

impl Reply {
    /// `status` with a JSON body.
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            hang: false,
        }
    }

    /// `status` with Didit's error shape `{"code", "detail"}`.
    pub fn error(status: u16, code: &str, detail: &str) -> Reply {
        Reply::json(
            status,
            serde_json::json!({ "code": code, "detail": detail }),
        )
    }

    /// `status` with `{"detail"}` only.
    pub fn detail(status: u16, detail: &str) -> Reply {
        Reply::json(status, serde_json::json!({ "detail": detail }))
    }

    /// `status` with a plain-text body.
    pub fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
            hang: false,
        }
    }

    /// `status` with no body at all.
    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            hang: false,
        }
    }

    /// Never answers (the connection stays open until the client gives up).
    pub fn hang() -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: Vec::new(),
            hang: true,
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// One request as the stub received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Which endpoint.
    pub route: Route,
    /// HTTP method.
    pub method: Method,
    /// Path.
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Vec<u8>,
}

impl Recorded {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

#[derive(Default)]
struct Script {
    replies: HashMap<Route, Reply>,
    requests: Vec<Recorded>,
}

type Shared = Arc<Mutex<Script>>;

/// The running stub; stops when dropped.
pub struct StubDidit {
    addr: SocketAddr,
    script: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl StubDidit {
    /// Starts a stub on 127.0.0.1:0. Unscripted endpoints answer 599 so that a test that forgot one fails loudly.
    pub async fn start() -> StubDidit {
        let script: Shared = Arc::default();
        let app = Router::new().fallback(handle).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stub");
        let addr = listener.local_addr().expect("stub address");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("stub server");
        });
        StubDidit { addr, script, task }
    }

    /// The base URL to give the client (no `/v3`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, `route` answers `reply`.
    pub fn set(&self, route: Route, reply: Reply) {
        self.script.lock().unwrap().replies.insert(route, reply);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.script.lock().unwrap().requests.clone()
    }

    /// How many requests `route` received.
    pub fn count(&self, route: Route) -> usize {
        self.script
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.route == route)
            .count()
    }

    /// The last request `route` received.
    pub fn last(&self, route: Route) -> Recorded {
        self.requests()
            .into_iter()
            .rev()
            .find(|r| r.route == route)
            .unwrap_or_else(|| panic!("no {route:?} request received"))
    }
}

impl Drop for StubDidit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(script): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, 16 * 1024 * 1024)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    let route = Route::of(&parts.method, parts.uri.path());
    let reply = {
        let mut script = script.lock().unwrap();
        script.requests.push(Recorded {
            route,
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts.headers.clone(),
            body,
        });
        script.replies.get(&route).cloned()
    };
    let reply =
        reply.unwrap_or_else(|| Reply::detail(599, "stub: no reply scripted for this route"));
    if reply.hang {
        std::future::pending::<()>().await;
    }
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() = StatusCode::from_u16(reply.status).expect("valid status");
    for (name, value) in reply.headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(&value).expect("header value"),
        );
    }
    response
}
