//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{BoxError, Service, ServiceExt, service_fn};

/// What the test service should do with one request.
#[derive(Clone)]
pub enum Cmd {
    Ok,
    Fail,
    /// An error the given value becomes (our own rejections, for instance).
    Error(Arc<dyn Fn() -> BoxError + Send + Sync>),
    /// Succeed after this long.
    Slow(Duration),
    /// Never answer.
    Hang,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Ok => f.write_str("Ok"),
            Cmd::Fail => f.write_str("Fail"),
            Cmd::Error(_) => f.write_str("Error(..)"),
            Cmd::Slow(d) => write!(f, "Slow({d:?})"),
            Cmd::Hang => f.write_str("Hang"),
        }
    }
}

/// A service that obeys `Cmd` and counts the calls that reach it.
#[derive(Clone, Debug, Default)]
pub struct Counter {
    pub calls: Arc<AtomicUsize>,
    /// Inner futures alive right now.
    pub live: Arc<AtomicUsize>,
    pub max_live: Arc<AtomicUsize>,
}

struct LiveGuard(Counter);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

impl Counter {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn service(
        &self,
    ) -> impl Service<Cmd, Response = (), Error = BoxError, Future = BoxFut> + Clone + Send + 'static
    {
        let me = self.clone();
        service_fn(move |cmd: Cmd| -> BoxFut {
            me.calls.fetch_add(1, Ordering::SeqCst);
            let live = me.live.fetch_add(1, Ordering::SeqCst) + 1;
            me.max_live.fetch_max(live, Ordering::SeqCst);
            let guard = LiveGuard(me.clone());
            Box::pin(async move {
                let _guard = guard;
                match cmd {
                    Cmd::Ok => Ok(()),
                    Cmd::Fail => Err("dependency failed".into()),
                    Cmd::Error(f) => Err(f()),
                    Cmd::Slow(d) => {
                        tokio::time::sleep(d).await;
                        Ok(())
                    }
                    Cmd::Hang => std::future::pending().await,
                }
            })
        })
    }
}

/// Calls `svc` once with `ready().await` and `call`.
pub async fn call<S>(svc: &mut S, cmd: Cmd) -> Result<(), BoxError>
where
    S: Service<Cmd, Response = (), Error = BoxError>,
{
    svc.ready().await?.call(cmd).await
}
