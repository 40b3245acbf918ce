//! The guest lifecycle in the state: staging modules (compiled in the
//! background), activating one with its migration, and the swap history.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use openraft::StorageIOError;

use super::apply::StateMachineStore;
use super::keys::{
    KEY_GUEST_HASH, KEY_GUEST_HISTORY, KEY_GUEST_MODULE, KEY_GUEST_SINCE, KEY_STAGED_ORDER,
    PREFIX_STAGED,
};
use super::reader::ActiveGuest;
use super::{SwapRecord, encode, read_err, write_err};
use crate::raft::disk::read_meta;
use crate::raft::redo::Write;
use crate::raft::{OpOutput, OpResult, typ};
use crate::runtime::{Context, GuestInstance, GuestModule, GuestRuntime};

/// The most staged modules kept. Staging one more drops the one staged
/// earliest; a successful activation drops the activated module and every
/// one staged before it. Both depend only on the log, so every replica
/// keeps the same ones.
pub const MAX_STAGED: usize = 4;

/// Compiles staged modules on one background thread, in staging order, so
/// that activating one finds it ready (and the compile cache filled)
/// instead of compiling on the apply path. However many modules are
/// staged, there is one compile at a time.
#[derive(Debug)]
pub(super) struct Compiler {
    /// The queue; `None` when the thread could not be started (activations
    /// then compile on the apply path).
    jobs: Option<std::sync::mpsc::Sender<(String, Vec<u8>)>>,
    /// Hashes still staged: a job for a module dropped meanwhile is skipped.
    wanted: Arc<Mutex<HashSet<String>>>,
    /// Finished compiles of modules still staged, by hash.
    done: Arc<Mutex<HashMap<String, GuestModule>>>,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Compiler {
    /// Starts the compile thread; it ends when the compiler is dropped.
    pub(super) fn start(runtime: GuestRuntime) -> Self {
        let (sender, receiver) = std::sync::mpsc::channel::<(String, Vec<u8>)>();
        let wanted: Arc<Mutex<HashSet<String>>> = Arc::default();
        let done: Arc<Mutex<HashMap<String, GuestModule>>> = Arc::default();
        let (thread_wanted, thread_done) = (wanted.clone(), done.clone());
        let started = std::thread::Builder::new()
            .name("guest-compile".into())
            .spawn(move || {
                for (hash, module) in receiver {
                    if !locked(&thread_wanted).contains(&hash) {
                        continue;
                    }
                    // A failure is not recorded: the activation loads the
                    // module again and decides.
                    if let Ok(loaded) = runtime.load(&module) {
                        let wanted = locked(&thread_wanted);
                        if wanted.contains(&hash) {
                            locked(&thread_done).insert(hash, loaded);
                        }
                    }
                }
            });
        let jobs = match started {
            Ok(_) => Some(sender),
            Err(error) => {
                tracing::warn!(%error, "cannot start the guest compile thread; staged guests compile when activated");
                None
            }
        };
        Self { jobs, wanted, done }
    }

    /// Queues `module` for compiling.
    pub(super) fn enqueue(&self, hash: &str, module: &[u8]) {
        if let Some(jobs) = &self.jobs
            && locked(&self.wanted).insert(hash.to_owned())
        {
            let _ = jobs.send((hash.to_owned(), module.to_vec()));
        }
    }

    /// The compiled module `hash`, if its compile finished.
    pub(super) fn take(&self, hash: &str) -> Option<GuestModule> {
        locked(&self.wanted).remove(hash);
        locked(&self.done).remove(hash)
    }

    /// Stops wanting `hash`: a queued compile of it is skipped, a finished
    /// one thrown away.
    pub(super) fn forget(&self, hash: &str) {
        let mut wanted = locked(&self.wanted);
        wanted.remove(hash);
        locked(&self.done).remove(hash);
    }

    /// Forgets every hash that is not in `staged`.
    pub(super) fn retain(&self, staged: &HashMap<String, Vec<u8>>) {
        let mut wanted = locked(&self.wanted);
        wanted.retain(|hash| staged.contains_key(hash));
        locked(&self.done).retain(|hash, _| staged.contains_key(hash));
    }
}

impl StateMachineStore {
    /// Reads the staged modules (queueing their compiles) and the active
    /// guest back from the tree.
    pub(super) fn load_guests(&mut self) -> Result<(), typ::StorageError> {
        self.staged.clear();
        for item in self.tree.scan_prefix(PREFIX_STAGED) {
            let (key, module) = item.map_err(read_err)?;
            let hash = String::from_utf8_lossy(&key[PREFIX_STAGED.len()..]).into_owned();
            self.staged.insert(hash, module.to_vec());
        }
        // Modules staged before the order was recorded count as the
        // earliest, in hash order: still the same on every replica.
        let recorded: Vec<String> = read_meta(
            &self.tree,
            KEY_STAGED_ORDER,
            StorageIOError::read_state_machine,
        )?
        .unwrap_or_default();
        let mut unordered: Vec<String> = self
            .staged
            .keys()
            .filter(|hash| !recorded.contains(hash))
            .cloned()
            .collect();
        unordered.sort();
        self.staged_order = unordered;
        self.staged_order.extend(
            recorded
                .into_iter()
                .filter(|hash| self.staged.contains_key(hash)),
        );
        self.compiler.retain(&self.staged);
        for hash in &self.staged_order {
            self.compiler.enqueue(hash, &self.staged[hash]);
        }
        self.load_active_guest()
    }

    /// Drops the staged module `hash`: from the state (through `writes`),
    /// from memory and from the compile queue.
    pub(super) fn drop_staged(&mut self, hash: &str, writes: &mut Vec<Write>) {
        writes.push(([PREFIX_STAGED, hash.as_bytes()].concat(), None));
        self.staged.remove(hash);
        self.staged_order.retain(|h| h != hash);
        self.compiler.forget(hash);
    }

    /// Loads the guest recorded in the state as active (or none).
    pub(super) fn load_active_guest(&mut self) -> Result<(), typ::StorageError> {
        let module = self.tree.get(KEY_GUEST_MODULE).map_err(read_err)?;
        let since: u64 = read_meta(
            &self.tree,
            KEY_GUEST_SINCE,
            StorageIOError::read_state_machine,
        )?
        .unwrap_or(0);
        let active = match module {
            Some(bytes) => {
                let module = self
                    .runtime
                    .load(&bytes)
                    .map_err(|e| read_err(format!("the stored active guest does not load: {e}")))?;
                Some(module)
            }
            None => None,
        };
        self.activate(active, since);
        Ok(())
    }

    pub(super) fn activate(&mut self, module: Option<GuestModule>, since: u64) {
        self.instance = module
            .as_ref()
            .map(|m| m.instantiate(Arc::new(self.reader.state.clone())));
        let active = module.map(|module| {
            Arc::new(ActiveGuest {
                module,
                since,
                queries: Mutex::default(),
            })
        });
        *self
            .reader
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = active;
    }

    /// Stores a module in the state and starts compiling it.
    pub(super) fn stage_guest(
        &mut self,
        module: &[u8],
        writes: &mut Vec<Write>,
    ) -> Result<OpResult, typ::StorageError> {
        use sha2::Digest as _;
        let hash = hex::encode(sha2::Sha256::digest(module));
        writes.push((
            [PREFIX_STAGED, hash.as_bytes()].concat(),
            Some(module.to_vec()),
        ));
        self.staged.insert(hash.clone(), module.to_vec());
        self.staged_order.retain(|h| h != &hash);
        self.staged_order.push(hash.clone());
        while self.staged_order.len() > MAX_STAGED {
            let earliest = self.staged_order[0].clone();
            tracing::info!(hash = %earliest, "dropping the earliest staged guest");
            self.drop_staged(&earliest, writes);
        }
        writes.push((KEY_STAGED_ORDER.to_vec(), Some(encode(&self.staged_order)?)));
        self.compiler.enqueue(&hash, module);
        Ok(Ok(OpOutput::Staged(hash)))
    }

    /// Makes the staged module `hash` the active guest from `ctx.index` on.
    /// Every check here depends only on replicated state and the module
    /// bytes, so every replica reaches the same verdict.
    pub(super) fn activate_guest(
        &mut self,
        ctx: Context,
        hash: &str,
        force: bool,
        writes: &mut Vec<Write>,
    ) -> Result<OpResult, typ::StorageError> {
        let Some(module) = self.staged.get(hash).cloned() else {
            return Ok(Err(format!(
                "no staged guest has hash {hash}; stage it first"
            )));
        };
        let ready = self.compiler.take(hash);
        // A replica whose background compile has not finished waits for it
        // here (it compiles now): it never skips the activation. Only a
        // verdict on the module refuses it; when this node failed to load
        // it (no memory, no free instance slot, a failed mmap), the other
        // replicas may well have switched, so this one stops applying and
        // tries again when it restarts, rather than diverge.
        let loaded = match ready.map_or_else(|| self.runtime.load(&module), Ok) {
            Ok(loaded) => loaded,
            Err(e) if e.is_module_property() => return Ok(Err(e.to_string())),
            Err(e) => {
                tracing::error!(index = ctx.index, %hash, error = %e, "cannot activate the staged guest on this node; stopping until restart");
                return Err(write_err(format!(
                    "activating guest {hash} at index {}: {e}",
                    ctx.index
                )));
            }
        };
        let previous = self.reader.active();
        if !force
            && let Some(previous) = &previous
            && let Err(refusal) = loaded.may_replace(&previous.module)
        {
            return Ok(Err(refusal));
        }

        // The writes of earlier commands in this apply call move to the new
        // instance, so they commit with the batch whatever happens next.
        let pending = self
            .instance
            .as_mut()
            .map(GuestInstance::take_writes)
            .unwrap_or_default();
        let mut instance = loaded.instantiate(Arc::new(self.reader.state.clone()));
        instance.restore_writes(pending);
        if let Some(previous) = &previous {
            let info = crate::runtime::GuestInfo {
                name: previous.module.name().to_owned(),
                version: previous.module.version().to_string(),
            };
            let outcome = instance.migrate(ctx, info).map_err(write_err)?;
            if let Err(reason) = outcome.result {
                let pending = instance.take_writes();
                if let Some(old) = self.instance.as_mut() {
                    old.restore_writes(pending);
                }
                return Ok(Err(format!("the migration failed: {reason}")));
            }
        }

        let record = SwapRecord {
            index: ctx.index,
            name: loaded.name().to_owned(),
            version: loaded.version().to_string(),
            hash: hash.to_owned(),
            forced: force,
        };
        // An earlier activation in this apply call wrote the history only
        // to `writes` so far; the newest value wins.
        let pending = writes
            .iter()
            .rev()
            .find(|(key, _)| key == KEY_GUEST_HISTORY)
            .and_then(|(_, value)| value.as_deref());
        let mut history: Vec<SwapRecord> = match pending {
            Some(bytes) => rmp_serde::from_slice(bytes).map_err(read_err)?,
            None => read_meta(
                &self.tree,
                KEY_GUEST_HISTORY,
                StorageIOError::read_state_machine,
            )?
            .unwrap_or_default(),
        };
        history.push(record.clone());
        writes.push((KEY_GUEST_HISTORY.to_vec(), Some(encode(&history)?)));
        writes.push((KEY_GUEST_HASH.to_vec(), Some(encode(&hash)?)));
        writes.push((KEY_GUEST_MODULE.to_vec(), Some(module)));
        writes.push((KEY_GUEST_SINCE.to_vec(), Some(encode(&ctx.index)?)));
        // The swap is done: this module and every one staged before it are
        // dropped (those were abandoned or superseded); modules staged after
        // it stay, so a deploy that raced with this one can still activate.
        let done = self
            .staged_order
            .iter()
            .position(|h| h == hash)
            .map_or(0, |position| position + 1);
        let finished: Vec<String> = self.staged_order.drain(..done).collect();
        for staged in finished {
            self.drop_staged(&staged, writes);
        }
        let order = (!self.staged_order.is_empty())
            .then(|| encode(&self.staged_order))
            .transpose()?;
        writes.push((KEY_STAGED_ORDER.to_vec(), order));
        self.activate(Some(loaded), ctx.index);
        self.instance = Some(instance);
        tracing::info!(index = ctx.index, name = %record.name, version = %record.version, %hash, "guest activated");
        Ok(Ok(OpOutput::Activated(record)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Op;
    use crate::raft::state_machine::testing::*;
    use crate::runtime::BUNDLED_GUEST;
    use openraft::storage::RaftStateMachine as _;

    /// Two swaps in one apply call both reach the history: the second one
    /// builds on the first one's record, which is not in the tree yet.
    #[tokio::test]
    async fn two_swaps_in_one_apply_call_keep_both_history_records() -> anyhow::Result<()> {
        use sha2::Digest as _;
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        let hash = hex::encode(sha2::Sha256::digest(BUNDLED_GUEST));
        let stage = || Op::StageGuest {
            module: BUNDLED_GUEST.to_vec(),
        };
        let activate = || Op::ActivateGuest {
            hash: hash.clone(),
            force: true,
        };
        let responses = sm
            .apply([
                entry(1, vec![stage()]),
                entry(2, vec![activate()]),
                entry(3, vec![stage()]),
                entry(4, vec![activate()]),
            ])
            .await?;
        for response in &responses {
            assert!(response.results.iter().all(Result::is_ok), "{responses:?}");
        }
        let history = sm.reader().guest_history()?;
        let indexes: Vec<u64> = history.iter().map(|record| record.index).collect();
        assert_eq!(indexes, [2, 4]);
        Ok(())
    }

    /// The staged hashes in the state, sorted.
    fn staged(sm: &StateMachineStore) -> Vec<String> {
        let mut hashes: Vec<String> = sm
            .tree
            .scan_prefix(PREFIX_STAGED)
            .keys()
            .map(|k| String::from_utf8_lossy(&k.expect("key")[PREFIX_STAGED.len()..]).into_owned())
            .collect();
        hashes.sort();
        hashes
    }

    fn sorted(mut hashes: Vec<String>) -> Vec<String> {
        hashes.sort();
        hashes
    }

    /// At most MAX_STAGED modules stay staged; staging another drops the
    /// one staged earliest, and staging a module again makes it the latest.
    #[tokio::test]
    async fn only_the_latest_staged_modules_are_kept() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        sm.apply((0..6).map(|n| stage(u64::from(n) + 1, variant(n))))
            .await?;
        let latest = (2..6).map(|n| hash_of(&variant(n))).collect();
        assert_eq!(staged(&sm), sorted(latest));

        sm.apply([stage(7, variant(2)), stage(8, variant(6))])
            .await?;
        let kept = [2, 4, 5, 6].map(|n| hash_of(&variant(n))).to_vec();
        assert_eq!(staged(&sm), sorted(kept.clone()));

        drop(sm);
        let mut sm = open(&dir)?;
        sm.apply([stage(9, variant(7))]).await?;
        let kept = [2, 5, 6, 7].map(|n| hash_of(&variant(n))).to_vec();
        assert_eq!(staged(&sm), sorted(kept), "the order survives a reopen");
        Ok(())
    }

    /// A failed activation keeps the staged modules; a successful one drops
    /// the activated module (it is now stored as the active guest) and every
    /// module staged before it, but none staged after it.
    #[tokio::test]
    async fn successful_activation_drops_the_modules_staged_up_to_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        let (first, second, third) = (variant(0), variant(1), variant(2));
        sm.apply([
            stage(1, first.clone()),
            stage(2, second.clone()),
            stage(3, third.clone()),
        ])
        .await?;
        let missing = Op::ActivateGuest {
            hash: hash_of(&variant(9)),
            force: true,
        };
        let refused = sm.apply([entry(3, vec![missing])]).await?;
        assert!(refused[0].results[0].is_err());
        assert_eq!(staged(&sm).len(), 3, "a failed activation drops nothing");

        let activate = Op::ActivateGuest {
            hash: hash_of(&second),
            force: true,
        };
        let done = sm.apply([entry(4, vec![activate])]).await?;
        assert!(done[0].results[0].is_ok(), "{:?}", done[0].results);
        assert_eq!(staged(&sm), [hash_of(&third)]);

        let activate = Op::ActivateGuest {
            hash: hash_of(&third),
            force: true,
        };
        sm.apply([entry(5, vec![activate])]).await?;
        assert!(staged(&sm).is_empty(), "left staged: {:?}", staged(&sm));
        assert!(sm.tree.get(KEY_STAGED_ORDER)?.is_none());
        let active = sm.reader().active().expect("an active guest");
        assert_eq!(active.module.hash(), hash_of(&third));
        Ok(())
    }

    /// `module` with the one occurrence of `from` replaced by `to`, of the
    /// same length.
    fn patched(module: &[u8], from: &str, to: &str) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(
            from.len() == to.len(),
            "{from:?} and {to:?} differ in length"
        );
        let at: Vec<usize> = module
            .windows(from.len())
            .enumerate()
            .filter(|(_, window)| *window == from.as_bytes())
            .map(|(at, _)| at)
            .collect();
        anyhow::ensure!(at.len() == 1, "{from:?} occurs {} times", at.len());
        let mut module = module.to_vec();
        module[at[0]..at[0] + to.len()].copy_from_slice(to.as_bytes());
        Ok(module)
    }

    /// How the bundled guest refuses a command it cannot decode.
    const REFUSAL: &str = "unknown command tag";
    /// How the rebuilt guest of [`rebuilt_guest`] refuses it.
    const REBUILT_REFUSAL: &str = "unknown command TAG";

    /// The bundled guest as a next release would build it: a higher version
    /// (so a swap needs no force) and another wording of [`REFUSAL`], so
    /// that which guest ran a command shows in its answer.
    fn rebuilt_guest(runtime: &GuestRuntime) -> anyhow::Result<(Vec<u8>, String)> {
        let version = runtime.load(BUNDLED_GUEST)?.version().clone();
        let next = semver::Version::new(version.major, version.minor, version.patch + 1);
        let module = patched(BUNDLED_GUEST, &version.to_string(), &next.to_string())?;
        Ok((
            patched(&module, REFUSAL, REBUILT_REFUSAL)?,
            next.to_string(),
        ))
    }

    fn set(key: &[u8], value: &[u8]) -> Op {
        Op::Apply(
            guest_kv::command::Command::Set {
                key,
                value,
                ttl_ms: 0,
            }
            .encode(),
        )
    }

    /// A command no guest-kv decodes: each build refuses it in its words.
    fn undecodable() -> Op {
        Op::Apply(vec![0xff])
    }

    /// The refusal of an op, or a failure naming what it produced instead.
    fn refusal(result: &OpResult) -> anyhow::Result<&str> {
        match result {
            Err(refusal) => Ok(refusal),
            Ok(output) => anyhow::bail!("expected a refusal, got {output:?}"),
        }
    }

    /// The guest-kv answer of an op.
    fn answer(result: &OpResult) -> anyhow::Result<guest_kv::command::Response> {
        match result {
            Ok(OpOutput::Guest(bytes)) => {
                Ok(guest_kv::command::Response::decode(bytes)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?)
            }
            other => anyhow::bail!("expected a guest answer, got {other:?}"),
        }
    }

    /// The value of `key`, as a query through the active guest reads it.
    fn read(sm: &StateMachineStore, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        let get = guest_kv::command::Command::Get { key }.encode();
        let outcome = sm.reader().query(0, &get)?;
        match answer(&outcome.result.map(OpOutput::Guest))? {
            guest_kv::command::Response::Value(value) => Ok(value),
            other => anyhow::bail!("a get answered {other:?}"),
        }
    }

    /// A swap in the middle of one apply call: the commands before it run on
    /// the old guest, those after it on the new one, which sees the old
    /// one's writes of the same call; all of them commit together, and a
    /// reopen finds the same state and the new guest active.
    #[tokio::test]
    async fn swap_in_the_middle_of_an_apply_call_splits_the_commands_between_the_guests()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        let (rebuilt, next_version) = rebuilt_guest(&sm.runtime)?;
        let (old_hash, new_hash) = (hash_of(BUNDLED_GUEST), hash_of(&rebuilt));
        let first = sm
            .apply([
                stage(1, BUNDLED_GUEST.to_vec()),
                entry(
                    2,
                    vec![Op::ActivateGuest {
                        hash: old_hash.clone(),
                        force: false,
                    }],
                ),
            ])
            .await?;
        assert!(first[1].results[0].is_ok(), "{first:?}");

        let cas = Op::Apply(
            guest_kv::command::Command::CompareAndSet {
                key: b"a",
                expected: Some(b"1"),
                value: b"2",
                ttl_ms: 0,
            }
            .encode(),
        );
        let responses = sm
            .apply([
                stage(3, rebuilt.clone()),
                entry(4, vec![set(b"a", b"1"), undecodable()]),
                entry(
                    5,
                    vec![Op::ActivateGuest {
                        hash: new_hash.clone(),
                        force: false,
                    }],
                ),
                entry(6, vec![cas, undecodable(), set(b"b", b"3")]),
            ])
            .await?;
        let [_, before, swap, after] = responses.as_slice() else {
            anyhow::bail!("{} responses for 4 entries", responses.len());
        };
        assert_eq!(
            answer(&before.results[0])?,
            guest_kv::command::Response::Done
        );
        assert!(refusal(&before.results[1])?.contains(REFUSAL), "{before:?}");
        match &swap.results[0] {
            Ok(OpOutput::Activated(record)) => {
                assert_eq!(
                    (record.index, record.version.as_str()),
                    (5, next_version.as_str())
                );
            }
            other => anyhow::bail!("the swap answered {other:?}"),
        }
        assert_eq!(
            answer(&after.results[0])?,
            guest_kv::command::Response::Swapped {
                swapped: true,
                current: Some(b"2".to_vec()),
            },
            "the new guest did not see the old one's write of the same call"
        );
        assert!(
            refusal(&after.results[1])?.contains(REBUILT_REFUSAL),
            "{after:?}"
        );
        assert_eq!(
            answer(&after.results[2])?,
            guest_kv::command::Response::Done
        );

        let reader = sm.reader();
        let active = reader
            .active()
            .ok_or_else(|| anyhow::anyhow!("no active guest"))?;
        assert_eq!((active.module.hash(), active.since), (new_hash.as_str(), 5));
        let history: Vec<(u64, String)> = reader
            .guest_history()?
            .into_iter()
            .map(|record| (record.index, record.hash))
            .collect();
        assert_eq!(history, [(2, old_hash), (5, new_hash.clone())]);
        assert_eq!(read(&sm, b"a")?, Some(b"2".to_vec()));
        assert_eq!(read(&sm, b"b")?, Some(b"3".to_vec()));
        let state_hash = reader.state_hash()?;
        // The guest's query instances read the tree too: every handle goes.
        drop((sm, reader, active));

        let mut sm = open(&dir)?;
        assert_eq!(sm.applied_state().await?.0, Some(log_id(6)));
        assert_eq!(sm.reader().state_hash()?, state_hash);
        let active = sm
            .reader()
            .active()
            .ok_or_else(|| anyhow::anyhow!("no guest after a reopen"))?;
        assert_eq!((active.module.hash(), active.since), (new_hash.as_str(), 5));
        let again = sm.apply([entry(7, vec![undecodable()])]).await?;
        assert!(
            refusal(&again[0].results[0])?.contains(REBUILT_REFUSAL),
            "{again:?}"
        );
        Ok(())
    }
}
