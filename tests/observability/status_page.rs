//! The status page in a real browser: headless Chromium, driven over the
//! Chrome DevTools protocol. It loads `/firebreak/`, sees a breaker turn
//! Open after faults are injected, clicks its reset button and sees it
//! Closed again. It also sees a rate limiter and a keyed breaker (keys
//! counted by state) drawn, and resets the keyed breaker's keys with its
//! button. Screenshots go to `target/tmp/`.
//!
//! Needs Debian's `chromium` on the PATH (`apt-get install -y
//! --no-install-recommends chromium`). Without it the test fails; it never
//! skips.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::admin::Admin;
use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};
use tower_firebreak::queue::Job;
use tower_firebreak::queue::Queue;
use tower_firebreak::queue::memory::MemoryQueue;
use tower_firebreak::rate_limit::RateLimitLayer;
use tower_firebreak::registry::Registry;

const CHROMIUM: &str = "chromium";

/// A headless Chromium with its DevTools endpoint.
struct Browser {
    _child: Child,
    _profile: tempfile::TempDir,
    ws_url: String,
}

async fn launch() -> Browser {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "--window-size=1000,800",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start `{CHROMIUM}` ({e}); install it with \
                 `apt-get install -y --no-install-recommends chromium`"
            )
        });
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let ws_url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("DevTools listening on ") {
                return url.trim().to_owned();
            }
        }
        panic!("chromium exited without a DevTools endpoint");
    })
    .await
    .expect("chromium printed its DevTools endpoint within 30 s");
    // Keep draining stderr so chromium never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Browser {
        _child: child,
        _profile: profile,
        ws_url,
    }
}

/// A minimal DevTools protocol client over one websocket, in flat session
/// mode.
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next: u64,
    session: Option<String>,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect to the DevTools websocket");
        Cdp {
            ws,
            next: 0,
            session: None,
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"))
                .expect("the websocket is open")
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"].as_u64() != Some(id) {
                continue; // an event
            }
            if let Some(err) = v.get("error") {
                panic!("{method} failed: {err}");
            }
            return v["result"].clone();
        }
    }

    /// Evaluates `expr` in the page; awaits it when it is a promise.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("{expr} threw: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// Waits (up to 15 s of wall time) until `expr` evaluates to `want`.
    async fn wait_for(&mut self, expr: &str, want: Value) {
        let mut last = Value::Null;
        for _ in 0..150 {
            last = self.eval(expr).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let page = self.eval("document.body.innerText").await;
        panic!("{expr} stayed {last}, expected {want}; the page reads:\n{page}");
    }

    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

const STATE: &str = "document.querySelector('#breaker-payments td.state')?.dataset.state ?? null";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_breaker_open_and_its_reset_button_closes_it() {
    let registry = Registry::new();
    let breaker = CircuitBreakerLayer::builder()
        .name("payments")
        .count_window(4)
        .minimum_calls(4)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(600))
        .build()
        .unwrap();
    let handle = breaker.handle();
    registry.add_breaker(handle.clone()).unwrap();
    let queue = MemoryQueue::new();
    for _ in 0..3 {
        queue
            .enqueue(Job::new(http::Method::POST, "/orders".parse().unwrap()))
            .await
            .unwrap();
    }
    registry.add_queue("orders", queue);
    let limiter = RateLimitLayer::per_second(50)
        .burst(10)
        .name("search")
        .registry(&registry);
    let _limited = limiter.layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
    let keyed = CircuitBreakerConfig {
        name: Some("hosts".into()),
        ..CircuitBreakerConfig::default()
    }
    .into_keyed_layer(|host: &String| host.clone())
    .unwrap()
    .registry(&registry);
    let keyed_handle = keyed.handle();
    let mut by_host = keyed.layer(service_fn(|h: String| async move { Ok::<_, BoxError>(h) }));
    for host in ["a", "b"] {
        by_host
            .ready()
            .await
            .unwrap()
            .call(host.into())
            .await
            .unwrap();
    }
    keyed_handle.get(&"b".to_owned()).unwrap().force_open();
    let svc = breaker.layer(service_fn(|fail: bool| async move {
        if fail {
            Err::<(), BoxError>("injected fault".into())
        } else {
            Ok(())
        }
    }));

    let addr = serve(Admin::new(registry).router()).await;
    let browser = launch().await;
    let mut cdp = Cdp::connect(&browser.ws_url).await;
    let target = cdp
        .call("Target.createTarget", json!({ "url": "about:blank" }))
        .await;
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        )
        .await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
    cdp.call("Page.enable", json!({})).await;
    cdp.call(
        "Page.navigate",
        json!({ "url": format!("http://{addr}/firebreak/") }),
    )
    .await;

    cdp.wait_for(STATE, json!("closed")).await;
    cdp.wait_for(
        "document.querySelector('#queue-orders td.depth')?.textContent ?? null",
        json!("3"),
    )
    .await;
    assert_eq!(
        cdp.eval("document.getElementById('reset-payments').disabled")
            .await,
        json!(true),
        "nothing to reset while closed"
    );

    // A rate limiter and a keyed breaker, each in its own table.
    cdp.wait_for(
        "[...document.querySelectorAll('#rate-limit-search td')].map(td => td.textContent).join('|')",
        json!("search|10|20.0 ms"),
    )
    .await;
    const KEYED: &str = "document.querySelector('#keyed-breaker-hosts td.by-state')";
    cdp.wait_for(
        "document.querySelector('#keyed-breaker-hosts td.keys')?.textContent ?? null",
        json!("2"),
    )
    .await;
    cdp.wait_for(&format!("{KEYED}?.dataset.forced_open ?? null"), json!("1"))
        .await;
    assert_eq!(
        cdp.eval("document.querySelector('#keyed-breaker-hosts td.listed').textContent")
            .await,
        json!("—"),
        "no key strings without label_keys"
    );
    cdp.eval("document.getElementById('reset-keyed-hosts').click(); true")
        .await;
    cdp.wait_for(&format!("{KEYED}?.dataset.closed ?? null"), json!("2"))
        .await;
    assert_eq!(
        keyed_handle.get(&"b".to_owned()).unwrap().state(),
        State::Closed,
        "the click reset every key"
    );

    // Faults: four failures in a window of four open the breaker.
    for _ in 0..4 {
        assert!(svc.clone().oneshot(true).await.is_err());
    }
    assert_eq!(handle.state(), State::Open);
    cdp.wait_for(STATE, json!("open")).await;
    assert_eq!(
        cdp.eval(
            "getComputedStyle(document.querySelector('#breaker-payments td.state')).backgroundColor"
        )
        .await,
        json!("rgb(198, 40, 40)"),
        "open is red"
    );
    cdp.wait_for(
        "[...document.querySelectorAll('#transitions tbody tr')].some(r => r.innerText.includes('failure or slow-call threshold reached'))",
        json!(true),
    )
    .await;
    let open_png = cdp.screenshot("status_page_open.png").await;

    // The page's own button, clicked as a user would.
    cdp.eval("document.getElementById('reset-payments').click(); true")
        .await;
    cdp.wait_for(STATE, json!("closed")).await;
    assert_eq!(handle.state(), State::Closed, "the click reset the breaker");
    let closed_png = cdp.screenshot("status_page.png").await;
    svc.clone().oneshot(false).await.expect("calls pass again");
    eprintln!(
        "screenshots: {} {}",
        open_png.display(),
        closed_png.display()
    );
}
