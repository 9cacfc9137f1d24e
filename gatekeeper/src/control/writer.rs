//! The asset writer: single-asset edits (tag changes, PUT/PATCH/DELETE of one asset) queue
//! here and a thread of its own applies them in batches through [`super::Control::change_assets`], so
//! a burst of edits pays the fixed costs of a change once, and no async worker waits for one.

use tokio::sync::{mpsc, oneshot};

use super::{ControlError, Handle, auth::Actor};
use crate::policy::AssetSpec;

/// Most writes taken into one batch.
const MAX_BATCH: usize = 4096;
/// How often the writer yields, looking for the next write, before it parks.
const YIELDS: usize = 64;

/// What a write does to an asset.
#[derive(Debug, Clone)]
pub enum AssetEdit {
    /// Creates or replaces it.
    Put(AssetSpec),
    /// An RFC 7396 JSON merge patch, applied to the asset as the writes before it left it.
    Patch(serde_json::Value),
    Delete,
}

/// The version tag of an asset (an HTTP entity tag, quoted): changes whenever the asset does.
pub fn etag(spec: &AssetSpec) -> String {
    use sha2::Digest as _;
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let digest = sha2::Sha256::digest(&json);
    format!("\"{}\"", digest.iter().take(12).map(|b| format!("{b:02x}")).collect::<String>())
}

/// One asset write waiting for the writer.
pub struct AssetWrite {
    pub name: String,
    pub edit: AssetEdit,
    /// Apply only if the asset's current [`etag`] is this one (`*`: only if it exists), as
    /// HTTP's `If-Match`: a client that read the asset first loses nothing written since.
    pub if_match: Option<String>,
    pub actor: Actor,
    pub action: &'static str,
    /// The asset as written (`None`: deleted), or why not.
    pub reply: oneshot::Sender<Result<Option<AssetSpec>, ControlError>>,
}

/// Where asset writes are queued.
#[derive(Clone)]
pub struct AssetWriter {
    tx: mpsc::Sender<AssetWrite>,
}

impl AssetWriter {
    /// Starts the writer thread over `control`; it ends when every `AssetWriter` is dropped.
    pub fn spawn(control: Handle) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<AssetWrite>(8192);
        std::thread::Builder::new().name("gk-writer".into()).spawn(move || {
            let mut next = None;
            loop {
                let Some(first) = next.take().or_else(|| rx.blocking_recv()) else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                control.lock().change_assets(batch);
                // The clients just answered usually write again at once: give them a moment
                // (yielding, not spinning) so the next batch is not a batch of one, and this
                // thread does not park and wake for each.
                for _ in 0..YIELDS {
                    if let Ok(w) = rx.try_recv() {
                        next = Some(w);
                        break;
                    }
                    std::thread::yield_now();
                }
            }
        })?;
        Ok(Self { tx })
    }

    /// Applies `edit` to asset `name` and waits until it is enforced and recorded; returns the
    /// asset as written (`None`: deleted).
    pub async fn write(
        &self,
        name: &str,
        edit: AssetEdit,
        if_match: Option<String>,
        actor: Actor,
        action: &'static str,
    ) -> Result<Option<AssetSpec>, ControlError> {
        let (reply, rx) = oneshot::channel();
        let w = AssetWrite { name: name.to_string(), edit, if_match, actor, action, reply };
        self.tx.send(w).await.map_err(|_| ControlError::Unavailable("the asset writer stopped"))?;
        rx.await.map_err(|_| ControlError::Unavailable("the asset writer stopped"))?
    }
}
