//! `GuestInstance`: runs a guest's calls under fuel and the stack limit,
//! against a write overlay (with the keys it touched), and its optional
//! migration and watch hooks.

use std::sync::Arc;

use wasmtime::{Store, Trap};

use super::bindings::{Change, Context, GuestInfo, HostState, StateMachine};
use super::{
    GuestModule, HostFault, MIGRATION_INTERFACE, Outcome, Overlay, StateRead, WATCH_INTERFACE,
    limiter, stack_limit,
};

/// One instance of a guest, with the overlay of writes its successful calls
/// made since the last [`GuestInstance::take_writes`].
///
/// A call that fails (the guest's `err`, a trap, out of fuel) leaves no write
/// behind. After a trap the wasm instance is thrown away and recreated on the
/// next call; the guest keeps no state of its own, so nothing is lost.
pub struct GuestInstance {
    module: GuestModule,
    base: Arc<dyn StateRead>,
    live: Option<Live>,
    /// The batch overlay while no store is live.
    batch: Overlay,
    /// The keys written since the last take, while no store is live.
    touched: Vec<Vec<u8>>,
}

impl std::fmt::Debug for GuestInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestInstance")
            .field("module", &self.module)
            .field("live", &self.live.is_some())
            .finish_non_exhaustive()
    }
}

/// A wasm instance and the store it lives in.
struct Live {
    store: Store<HostState>,
    guest: StateMachine,
    instance: wasmtime::component::Instance,
}

/// Why an instance could not start.
pub(super) enum StartError {
    /// A property of the module: instantiating it or its first call failed
    /// the same way on every node.
    Guest(String),
    /// A failure of this node.
    Host(HostFault),
}

pub(super) enum Call<'a> {
    Info,
    Apply(Context, &'a [u8]),
    /// A query and the fuel it may use.
    Query(Context, &'a [u8], u64),
    Migrate(Context, GuestInfo),
    /// The watch hook, and where its answer goes.
    Describe(Vec<Change>, &'a mut Option<Vec<Change>>),
}

impl GuestInstance {
    /// An instance of `module` reading committed state from `base`; see
    /// [`GuestModule::instantiate`].
    pub(super) fn new(module: GuestModule, base: Arc<dyn StateRead>) -> Self {
        Self {
            module,
            base,
            live: None,
            batch: Overlay::new(),
            touched: Vec::new(),
        }
    }

    /// The module this instance runs.
    pub fn module(&self) -> &GuestModule {
        &self.module
    }

    /// Applies one command; its writes join the pending overlay if it
    /// succeeds.
    ///
    /// # Errors
    /// [`HostFault`] when the host failed (storage I/O, instantiation); the
    /// command's outcome is then unknown and must not be recorded.
    pub fn apply(&mut self, ctx: Context, command: &[u8]) -> Result<Outcome, HostFault> {
        self.call(Call::Apply(ctx, command))
    }

    /// Answers a read-only query against the committed state and the pending
    /// overlay; a write attempt makes it fail.
    ///
    /// # Errors
    /// [`HostFault`] as for [`GuestInstance::apply`].
    pub fn query(&mut self, ctx: Context, request: &[u8]) -> Result<Outcome, HostFault> {
        let fuel = self.module.runtime.limits.fuel_per_call;
        self.call(Call::Query(ctx, request, fuel))
    }

    /// Like [`GuestInstance::query`], but with at most `fuel` (capped at the
    /// per-call budget): a query that needs more ends out of fuel, with
    /// `fuel_used` equal to the fuel given.
    ///
    /// # Errors
    /// [`HostFault`] as for [`GuestInstance::apply`].
    pub fn query_with_fuel(
        &mut self,
        ctx: Context,
        request: &[u8],
        fuel: u64,
    ) -> Result<Outcome, HostFault> {
        let fuel = fuel.min(self.module.runtime.limits.fuel_per_call);
        self.call(Call::Query(ctx, request, fuel))
    }

    /// Runs the guest's migration hook under the migration fuel budget; a
    /// guest without one succeeds at once.
    ///
    /// # Errors
    /// [`HostFault`] as for [`GuestInstance::apply`].
    pub fn migrate(&mut self, ctx: Context, previous: GuestInfo) -> Result<Outcome, HostFault> {
        if !self.module.has_migrate {
            return Ok(Outcome {
                result: Ok(Vec::new()),
                fuel_used: 0,
            });
        }
        self.call(Call::Migrate(ctx, previous))
    }

    /// The guest's `info`.
    ///
    /// # Errors
    /// [`HostFault`] with the reason when the call fails.
    pub fn info(&mut self) -> Result<GuestInfo, HostFault> {
        let mut info = None;
        let outcome = self.call_with(Call::Info, &mut info)?;
        outcome.result.map_err(HostFault)?;
        info.ok_or_else(|| HostFault("info returned nothing".into()))
    }

    /// Takes the writes of every successful call since the last take, for
    /// the caller to commit. The written keys not yet taken with
    /// [`GuestInstance::take_touched`] are forgotten.
    pub fn take_writes(&mut self) -> Overlay {
        match &mut self.live {
            Some(live) => {
                let state = live.store.data_mut();
                state.touched.clear();
                std::mem::take(&mut state.batch)
            }
            None => {
                self.touched.clear();
                std::mem::take(&mut self.batch)
            }
        }
    }

    /// Takes the keys that successful calls wrote since the last take, in
    /// write order and possibly repeated; with
    /// [`GuestInstance::pending_changes`] this attributes writes to the
    /// entry that made them.
    pub fn take_touched(&mut self) -> Vec<Vec<u8>> {
        match &mut self.live {
            Some(live) => std::mem::take(&mut live.store.data_mut().touched),
            None => std::mem::take(&mut self.touched),
        }
    }

    /// The pending value of each of `keys` (`None`: deleted), each key once,
    /// in key order: what those keys hold now that the calls which wrote
    /// them are done.
    pub fn pending_changes(&self, mut keys: Vec<Vec<u8>>) -> Vec<Change> {
        keys.sort_unstable();
        keys.dedup();
        let batch = match &self.live {
            Some(live) => &live.store.data().batch,
            None => &self.batch,
        };
        keys.into_iter()
            .filter_map(|key| {
                let value = batch.get(&key)?.clone();
                Some(Change { key, value })
            })
            .collect()
    }

    /// The user-facing form of one entry's store changes: what the guest's
    /// watch hook makes of them, or `changes` themselves when the guest has
    /// no hook or the hook fails (a trap, running out of fuel), which every
    /// replica does alike.
    ///
    /// # Errors
    /// [`HostFault`] as for [`GuestInstance::apply`].
    pub fn describe(&mut self, changes: Vec<Change>) -> Result<Vec<Change>, HostFault> {
        if !self.module.has_watch || changes.is_empty() {
            return Ok(changes);
        }
        let mut described = None;
        let outcome = self.call(Call::Describe(changes.clone(), &mut described))?;
        match (outcome.result, described) {
            (Ok(_), Some(described)) => Ok(described),
            (result, _) => {
                if let Err(reason) = result {
                    tracing::debug!(%reason, "the guest's watch hook failed; recording raw changes");
                }
                Ok(changes)
            }
        }
    }

    /// Puts back writes taken with [`GuestInstance::take_writes`] from
    /// another instance, so they commit with this one's (used when a guest is
    /// swapped in the middle of a batch).
    pub fn restore_writes(&mut self, writes: Overlay) {
        match &mut self.live {
            Some(live) => live.store.data_mut().batch.extend(writes),
            None => self.batch.extend(writes),
        }
    }

    fn call(&mut self, call: Call<'_>) -> Result<Outcome, HostFault> {
        self.call_with(call, &mut None)
    }

    pub(super) fn call_with(
        &mut self,
        call: Call<'_>,
        info: &mut Option<GuestInfo>,
    ) -> Result<Outcome, HostFault> {
        let limits = &self.module.runtime.limits;
        let stack_units = limits.stack_units;
        let fuel = match call {
            Call::Migrate(..) => limits.fuel_per_migration,
            Call::Query(_, _, fuel) => fuel,
            Call::Info | Call::Apply(..) | Call::Describe(..) => limits.fuel_per_call,
        };
        let Live {
            store,
            guest,
            instance,
        } = self.live()?;
        store.data_mut().read_only =
            matches!(call, Call::Query(..) | Call::Info | Call::Describe(..));
        store
            .set_fuel(fuel)
            .map_err(|e| HostFault(format!("setting fuel: {e}")))?;

        let returned: wasmtime::Result<Result<Vec<u8>, String>> = match call {
            Call::Apply(ctx, command) => guest.call_apply(&mut *store, ctx, command),
            Call::Query(ctx, request, _) => guest.call_query(&mut *store, ctx, request),
            Call::Info => guest.call_info(&mut *store).map(|i| {
                *info = Some(i);
                Ok(Vec::new())
            }),
            Call::Migrate(ctx, previous) => call_migrate(store, instance, ctx, previous),
            Call::Describe(changes, described) => {
                call_describe(store, instance, changes).map(|changes| {
                    *described = Some(changes);
                    Ok(Vec::new())
                })
            }
        };
        let fuel_used = fuel - store.get_fuel().unwrap_or(0);
        let state = store.data_mut();
        if matches!(returned, Ok(Ok(_))) {
            state.keep_call();
        } else {
            state.undo_call();
        }
        if let Some(fault) = state.fault.take() {
            self.drop_instance();
            return Err(HostFault(fault));
        }
        let result = match returned {
            Ok(result) => result,
            Err(error) => {
                let violation = state.violation.take();
                self.drop_instance();
                Err(describe_failure(error, violation, fuel, stack_units)?)
            }
        };
        Ok(Outcome { result, fuel_used })
    }

    /// The live store and guest, instantiating them if needed.
    fn live(&mut self) -> Result<&mut Live, HostFault> {
        // The module instantiated once already when it was loaded, and
        // instantiating reads no state: failing now is this node's fault.
        self.start().map_err(|e| match e {
            StartError::Guest(reason) => HostFault(format!(
                "guest {} no longer instantiates: {reason}",
                self.module.hash
            )),
            StartError::Host(fault) => fault,
        })?;
        self.live
            .as_mut()
            .ok_or_else(|| HostFault("the guest instance vanished".into()))
    }

    /// Instantiates the guest unless it is live already.
    pub(super) fn start(&mut self) -> Result<(), StartError> {
        if self.live.is_some() {
            return Ok(());
        }
        let limits = &self.module.runtime.limits;
        let state = HostState {
            base: self.base.clone(),
            batch: std::mem::take(&mut self.batch),
            undo: Vec::new(),
            touched: std::mem::take(&mut self.touched),
            read_only: false,
            fault: None,
            violation: None,
            limiter: limiter::GuestLimiter::new(limits.memory_bytes),
        };
        let mut store = Store::new(&self.module.runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        store
            .set_fuel(limits.fuel_per_call)
            .map_err(|e| StartError::Host(HostFault(format!("setting fuel: {e}"))))?;
        let hash = &self.module.hash;
        let instantiated = self
            .module
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .and_then(|instance| Ok((instance, StateMachine::new(&mut store, &instance)?)));
        let (instance, guest) = instantiated.map_err(|e| {
            // A trap (a data segment out of bounds, a start function that
            // traps) is the module's; anything else, such as an exhausted
            // instance pool or a failed mmap, is this node's.
            if e.is::<Trap>() && !is_host_failure(&e) {
                let reason = if hit_stack_limit(&e) {
                    "call stack exhausted (the stack limit)".to_owned()
                } else {
                    e.root_cause().to_string()
                };
                StartError::Guest(format!("instantiating it trapped: {reason}"))
            } else {
                StartError::Host(HostFault(format!("instantiating guest {hash}: {e:#}")))
            }
        })?;
        // The first export call of an instance runs one-time initialisation
        // (such as static constructors). Doing it here, with a call whose
        // result is discarded, makes every instance's first real call cost
        // the same fuel as any later one.
        if let Err(e) = guest.call_info(&mut store) {
            if let Some(fault) = store.data_mut().fault.take() {
                return Err(StartError::Host(HostFault(fault)));
            }
            let violation = store.data_mut().violation.take();
            let reason = describe_failure(e, violation, limits.fuel_per_call, limits.stack_units)
                .map_err(StartError::Host)?;
            return Err(StartError::Guest(format!(
                "initialising it failed: {reason}"
            )));
        }
        self.live = Some(Live {
            store,
            guest,
            instance,
        });
        Ok(())
    }

    fn drop_instance(&mut self) {
        if let Some(mut live) = self.live.take() {
            let state = live.store.data_mut();
            self.batch = std::mem::take(&mut state.batch);
            self.touched = std::mem::take(&mut state.touched);
        }
    }
}

/// Calls the optional `migration.migrate` export, which the generated
/// bindings of the base world do not cover.
fn call_migrate(
    store: &mut Store<HostState>,
    instance: &wasmtime::component::Instance,
    ctx: Context,
    previous: GuestInfo,
) -> wasmtime::Result<Result<Vec<u8>, String>> {
    let interface = instance
        .get_export_index(&mut *store, None, MIGRATION_INTERFACE)
        .ok_or_else(|| wasmtime::Error::msg("the guest has no migration interface"))?;
    let func = instance
        .get_export_index(&mut *store, Some(&interface), "migrate")
        .ok_or_else(|| wasmtime::Error::msg("the migration interface has no `migrate`"))?;
    let migrate = instance
        .get_typed_func::<(Context, GuestInfo), (Result<(), String>,)>(&mut *store, &func)?;
    let (result,) = migrate.call(&mut *store, (ctx, previous))?;
    Ok(result.map(|()| Vec::new()))
}

/// Calls the optional `watch.describe` export.
fn call_describe(
    store: &mut Store<HostState>,
    instance: &wasmtime::component::Instance,
    changes: Vec<Change>,
) -> wasmtime::Result<Vec<Change>> {
    let interface = instance
        .get_export_index(&mut *store, None, WATCH_INTERFACE)
        .ok_or_else(|| wasmtime::Error::msg("the guest has no watch interface"))?;
    let func = instance
        .get_export_index(&mut *store, Some(&interface), "describe")
        .ok_or_else(|| wasmtime::Error::msg("the watch interface has no `describe`"))?;
    let describe = instance.get_typed_func::<(Vec<Change>,), (Vec<Change>,)>(&mut *store, &func)?;
    let (described,) = describe.call(&mut *store, (changes,))?;
    Ok(described)
}

/// Turns a failed call into its deterministic error message, or a host fault
/// when the failure did not come from the guest.
///
/// On a live instance, wasmtime fails a call for one of four reasons:
/// - a trap (including running out of fuel): the guest's doing;
/// - an error one of the host's imports returned: those record themselves
///   in the store first (`violation` here, or a fault the caller checked
///   before);
/// - a canonical-ABI check on a value the guest produced: a list or string
///   out of bounds, a string that is not UTF-8, a variant, option or result
///   discriminant that does not exist, a misaligned pointer, a bad `realloc`
///   answer — a property of the module and the command, so every replica
///   reaches it;
/// - a failure of this machine: memory the host could not allocate, an
///   instance pool with no free slot, an I/O error, a native stack overflow
///   ([`is_host_failure`]).
///
/// Reaching the deterministic stack limit is a trap in the function the
/// instrumentation added ([`stack_limit::TRAP_FUNCTION_NAME`]), recognised
/// by the youngest frame of the trap's backtrace.
pub(super) fn describe_failure(
    error: wasmtime::Error,
    violation: Option<String>,
    fuel: u64,
    stack_units: u32,
) -> Result<String, HostFault> {
    if let Some(violation) = violation {
        return Ok(violation);
    }
    if is_host_failure(&error) {
        return Err(HostFault(format!("{error:#}")));
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return Ok(match trap {
            Trap::OutOfFuel => format!("the guest ran out of fuel (budget {fuel})"),
            Trap::UnreachableCodeReached if hit_stack_limit(&error) => format!(
                "the guest trapped: call stack exhausted (its frames exceeded the stack limit of {stack_units} units)"
            ),
            trap => format!(
                "the guest trapped: {}",
                trap.to_string().trim_start_matches("wasm trap: ")
            ),
        });
    }
    // The root cause only: the context wasmtime adds (a wasm backtrace) is
    // noise to a client.
    Ok(format!(
        "the guest broke the component ABI: {}",
        error.root_cause()
    ))
}

/// Whether the trap `error` came from the deterministic stack limit.
pub(super) fn hit_stack_limit(error: &wasmtime::Error) -> bool {
    error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|backtrace| backtrace.frames().first())
        .and_then(|frame| frame.func_name())
        == Some(stack_limit::TRAP_FUNCTION_NAME)
}

/// Whether `error` is a failure of this machine rather than of the guest:
/// an allocation the host could not make, an instance pool with no free
/// slot, an I/O error, or a native stack overflow. Such a failure must stop
/// the node, never become a result or a refusal that other replicas would
/// not reach.
///
/// The native stack is a backstop sized so that a guest within its
/// deterministic stack limit never overflows it ([`stack_limit`]); an
/// overflow means this node's generated code broke that bound, and another
/// node's might not.
pub(super) fn is_host_failure(error: &wasmtime::Error) -> bool {
    error.is::<wasmtime::OutOfMemory>()
        || error.is::<wasmtime::PoolConcurrencyLimitError>()
        || error.is::<std::io::Error>()
        || error.downcast_ref::<Trap>() == Some(&Trap::StackOverflow)
}
