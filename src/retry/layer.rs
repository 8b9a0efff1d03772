use super::{DefaultClassifier, Retry, RetryPolicy};
use tower::Layer;

/// Applies [`Retry`] with a [`RetryPolicy`].
///
/// Every service made from one layer shares the policy's
/// [`RetryBudget`](super::RetryBudget). See the [module docs](super).
#[derive(Clone, Debug)]
pub struct RetryLayer<C = DefaultClassifier> {
    policy: RetryPolicy<C>,
}

impl<C> RetryLayer<C> {
    /// A layer that retries with `policy`.
    pub fn new(policy: RetryPolicy<C>) -> Self {
        RetryLayer { policy }
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy<C> {
        &self.policy
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.policy.clone())
    }
}
