use super::{AnyError, Fallback, FromFn, FromService, Value};
use std::error::Error;
use tower::Layer;

/// Applies a [`Fallback`].
///
/// See the [module docs](super).
#[derive(Clone, Debug)]
pub struct FallbackLayer<R, P = AnyError> {
    recover: R,
    predicate: P,
}

impl<T: Clone> FallbackLayer<Value<T>> {
    /// Answers a failed call with a clone of `value`.
    pub fn value(value: T) -> Self {
        FallbackLayer {
            recover: Value(value),
            predicate: AnyError,
        }
    }
}

impl<F> FallbackLayer<FromFn<F>> {
    /// Answers a failed call with `f(err)`; `f` may itself fail.
    pub fn with_fn(f: F) -> Self {
        FallbackLayer {
            recover: FromFn(f),
            predicate: AnyError,
        }
    }
}

impl<S> FallbackLayer<FromService<S>> {
    /// Answers a failed call by calling `svc` with the same request. The
    /// request must be `Clone`: it is cloned before each call.
    pub fn service(svc: S) -> Self {
        FallbackLayer {
            recover: FromService(svc),
            predicate: AnyError,
        }
    }
}

impl<R, P> FallbackLayer<R, P> {
    /// Falls back only on the errors `predicate` selects; the rest pass
    /// through unchanged. Default: every error.
    pub fn when<P2>(self, predicate: P2) -> FallbackLayer<R, P2>
    where
        P2: Fn(&(dyn Error + 'static)) -> bool,
    {
        FallbackLayer {
            recover: self.recover,
            predicate,
        }
    }
}

impl<S, R: Clone, P: Clone> Layer<S> for FallbackLayer<R, P> {
    type Service = Fallback<S, R, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback::new(inner, self.recover.clone(), self.predicate.clone())
    }
}
