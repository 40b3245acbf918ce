//! The deterministic stack limit: rewrites every core module of a guest so
//! that call depth is counted in the module itself, in stack units, instead
//! of in native bytes that depend on the generated code and the CPU.
//!
//! # How
//!
//! Each defined function gets a cost in stack units, computed from its code
//! alone ([`function_cost`]): [`FRAME_UNITS`] + its parameters + its locals +
//! the largest operand-stack height any instruction in it reaches (as the
//! validator counts it) + one per [`INSTRUCTIONS_PER_UNIT`] instructions.
//! Every value counts one unit whatever its type.
//!
//! Each core module gets one mutable `i32` global, the stack height, which
//! starts at 0. The instrumentation is at the prologue and epilogues of every
//! defined function, not at call sites: the prologue adds the function's
//! cost and, when the height then exceeds the limit, calls a trap function
//! added to the module (named [`TRAP_FUNCTION_NAME`] in a `name` section);
//! every exit subtracts the cost again. That covers every way a function can
//! be entered (a call, `call_indirect`, `call_ref`, an export the host
//! calls, the start function, `realloc` from the canonical ABI) without the
//! thunks a call-site scheme needs. The exits are:
//!
//! - the end of the body and every branch to the function's outermost
//!   label: the body is wrapped in a `block` with the function's results, so
//!   they all leave through one place, followed by the epilogue;
//! - `return`: the epilogue goes just before it;
//! - tail calls (`return_call`, `return_call_indirect`, `return_call_ref`):
//!   the epilogue goes just before them, so the callee's prologue replaces
//!   the caller's frame in the count as it does on the machine.
//!
//! Exception handling and stack switching would leave a function without
//! running its epilogue; modules that use them are refused.
//!
//! A trap leaves the height raised, but the runtime throws away an instance
//! after any trap, so the next call starts from a fresh instance at 0.
//! Each core module counts only its own frames; the modules wit-component
//! adds around a guest hold no recursion, and their frames (a call or two
//! deep) fit in the headroom below.
//!
//! # The native stack backstop
//!
//! wasmtime's own `max_wasm_stack` stays, set by [`native_stack_bytes`] so
//! that a call within the unit limit does not reach it:
//! [`NATIVE_BYTES_PER_UNIT`] bytes per unit, plus [`NATIVE_HEADROOM_BYTES`]
//! for the host's frames above and between the guest's (the entry
//! trampolines, an import that calls the guest's `realloc`).
//!
//! Why 32 bytes per unit: the compiler's frame for a function holds the
//! values live across a call (spilled, at most 16 bytes each, a `v128`), the
//! arguments of the calls it makes (on its operand stack), the return
//! address, the saved frame pointer and registers. A value live across a
//! call is a parameter, a local or an operand-stack entry of the wasm code,
//! or a value the compiler chose to keep rather than recompute (a common
//! subexpression computed before and after the call), which needs at least
//! a few instructions of code to exist; [`INSTRUCTIONS_PER_UNIT`] charges
//! for those, and [`FRAME_UNITS`] for the fixed part. So a frame needs at
//! most 16 bytes per unit, and 32 leaves a factor of two. This is a bound on
//! what Cranelift does, not a proof: the unit tests build the shapes that
//! stress it (many live `i64` and `v128` locals, a deep operand stack, many
//! parameters, common subexpressions across a call) and check that they use
//! at most half the bytes per unit allowed, and that recursion in each ends
//! at the unit limit with the smallest native stack allowed. A native stack
//! overflow is therefore treated as a fault of the node, not a verdict on
//! the guest.
//!
//! # Determinism
//!
//! The rewrite is a pure function of the module bytes and the limit: costs
//! come from the code only, new types, the global and the trap function are
//! appended after the module's own in a fixed order, and nothing is
//! renumbered. The limit is a constant of [`super::Limits`], the same on
//! every node, so every replica traps at the same call on the same command.

use std::collections::HashMap;
use std::ops::Range;

use wasm_encoder::reencode::{Reencode as _, RoundtripReencoder};
use wasmparser::{Chunk, Operator, Parser, Payload, ValidPayload, Validator, WasmFeatures};

/// The units every function costs on top of its values: the return address,
/// the saved frame pointer and registers, the instance pointer.
pub const FRAME_UNITS: u64 = 4;

/// Instructions per stack unit of a function's cost: the compiler may keep
/// values alive that the wasm code recomputes rather than holds (common
/// subexpressions across a call), so the code's length bounds the native
/// frame too.
pub const INSTRUCTIONS_PER_UNIT: u64 = 4;

/// Native bytes allowed per stack unit when sizing the backstop.
pub const NATIVE_BYTES_PER_UNIT: usize = 32;

/// Native bytes allowed beyond the units: the host's entry into the guest,
/// trampolines, and host frames of an import call that calls back into the
/// guest's `realloc`.
pub const NATIVE_HEADROOM_BYTES: usize = 256 << 10;

/// The name of the function the instrumentation calls when a call would
/// exceed the limit. The runtime recognises the trap by it.
pub const TRAP_FUNCTION_NAME: &str = "raftwasm:stack-limit-exceeded";

/// The native stack (wasmtime's `max_wasm_stack`) that a guest whose
/// frames stay within `limit` units never exhausts.
pub fn native_stack_bytes(limit: u32) -> usize {
    (limit as usize)
        .saturating_mul(NATIVE_BYTES_PER_UNIT)
        .saturating_add(NATIVE_HEADROOM_BYTES)
}

/// The cost in stack units of a function with `params` parameters, `locals`
/// declared locals, a largest operand-stack height of `max_height` and
/// `instructions` instructions (the final `end` included).
pub fn function_cost(params: u64, locals: u64, max_height: u64, instructions: u64) -> u64 {
    FRAME_UNITS + params + locals + max_height + instructions.div_ceil(INSTRUCTIONS_PER_UNIT)
}

/// Why a module cannot be instrumented.
#[derive(Debug, thiserror::Error)]
pub enum InstrumentError {
    /// The bytes are not valid WebAssembly.
    #[error("{0}")]
    Invalid(String),
    /// The module uses a feature the stack count cannot follow.
    #[error(
        "the module uses {0}, which the deterministic stack limit cannot account for; build the guest without it"
    )]
    Unsupported(&'static str),
}

impl From<wasmparser::BinaryReaderError> for InstrumentError {
    fn from(error: wasmparser::BinaryReaderError) -> Self {
        InstrumentError::Invalid(error.to_string())
    }
}

impl<E: std::fmt::Display> From<wasm_encoder::reencode::Error<E>> for InstrumentError {
    fn from(error: wasm_encoder::reencode::Error<E>) -> Self {
        InstrumentError::Invalid(error.to_string())
    }
}

/// Instruments `wasm`, a core module or a component (every core module in
/// it, at any depth), so that no call chain holds more than `limit` stack
/// units at once.
///
/// # Errors
/// [`InstrumentError`] when the bytes are not valid WebAssembly or use a
/// feature the count cannot follow. Both are properties of the bytes.
pub fn instrument(wasm: &[u8], limit: u32) -> Result<Vec<u8>, InstrumentError> {
    if Parser::is_component(wasm) {
        instrument_component(wasm, limit, 0)
    } else {
        instrument_module(wasm, limit)
    }
}

/// How deep components may nest. The walk recurses once per level, so a
/// module made of nested components alone must not take the host's stack.
pub const MAX_COMPONENT_NESTING: usize = 100;

/// Copies a component section by section, instrumenting the core modules
/// and nested components in it. `depth` is how many components enclose it.
fn instrument_component(wasm: &[u8], limit: u32, depth: usize) -> Result<Vec<u8>, InstrumentError> {
    if depth >= MAX_COMPONENT_NESTING {
        return Err(InstrumentError::Unsupported(
            "components nested more than 100 deep",
        ));
    }
    let mut out = wasm_encoder::Component::new();
    let mut parser = Parser::new(0);
    let mut position = 0;
    loop {
        let (payload, consumed) = match parser.parse(&wasm[position..], true)? {
            Chunk::Parsed { consumed, payload } => (payload, consumed),
            Chunk::NeedMoreData(_) => {
                return Err(InstrumentError::Invalid(
                    "unexpected end of component".into(),
                ));
            }
        };
        position += consumed;
        match payload {
            Payload::Version { .. } => {}
            Payload::ModuleSection {
                unchecked_range, ..
            } => {
                let module = instrument_module(nested(wasm, &unchecked_range)?, limit)?;
                out.section(&wasm_encoder::RawSection {
                    id: wasm_encoder::ComponentSectionId::CoreModule as u8,
                    data: &module,
                });
                position = unchecked_range.end;
            }
            Payload::ComponentSection {
                unchecked_range, ..
            } => {
                let component =
                    instrument_component(nested(wasm, &unchecked_range)?, limit, depth + 1)?;
                out.section(&wasm_encoder::RawSection {
                    id: wasm_encoder::ComponentSectionId::Component as u8,
                    data: &component,
                });
                position = unchecked_range.end;
            }
            Payload::End(_) => break,
            payload => {
                if let Some((id, range)) = payload.as_section() {
                    out.section(&wasm_encoder::RawSection {
                        id,
                        data: &wasm[range],
                    });
                }
            }
        }
    }
    Ok(out.finish())
}

/// The bytes of a nested module or component, checked to lie within `wasm`.
fn nested<'a>(wasm: &'a [u8], range: &Range<usize>) -> Result<&'a [u8], InstrumentError> {
    wasm.get(range.clone())
        .ok_or_else(|| InstrumentError::Invalid("a nested module runs past the end".into()))
}

/// What the rewrite of one module learns as it goes.
#[derive(Default)]
struct ModuleState {
    imported_functions: u32,
    imported_globals: u32,
    defined_functions: u32,
    /// The index of the stack-height global, once it is written.
    height_global: u32,
    /// The `[] -> []` type of the trap function.
    trap_type: u32,
    /// A `[] -> results` type for each function type with several results,
    /// for the block that wraps such a function's body.
    block_types: HashMap<Vec<wasmparser::ValType>, u32>,
    global_emitted: bool,
}

impl ModuleState {
    fn trap_function(&self) -> u32 {
        self.imported_functions + self.defined_functions
    }
}

/// Instruments one core module; see the module documentation.
fn instrument_module(wasm: &[u8], limit: u32) -> Result<Vec<u8>, InstrumentError> {
    if !defines_functions(wasm)? {
        // No code, nothing to count; the module is validated when compiled.
        return Ok(wasm.to_vec());
    }
    let mut validator = Validator::new_with_features(WasmFeatures::all());
    let mut state = ModuleState::default();
    let mut out = wasm_encoder::Module::new();
    let mut code: Option<(wasm_encoder::CodeSection, u32)> = None;
    let mut globals_defined = 0;

    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        let valid = validator.payload(&payload)?;
        match &payload {
            Payload::Version { encoding, .. } => {
                if *encoding != wasmparser::Encoding::Module {
                    return Err(InstrumentError::Invalid("not a core module".into()));
                }
            }
            Payload::TypeSection(reader) => {
                let mut types = wasm_encoder::TypeSection::new();
                let mut count = 0;
                let mut several_results = Vec::new();
                for group in reader.clone() {
                    let group = group?;
                    for sub in group.types() {
                        count += 1;
                        if let wasmparser::CompositeInnerType::Func(func) =
                            &sub.composite_type.inner
                            && func.results().len() > 1
                        {
                            several_results.push(func.results().to_vec());
                        }
                    }
                }
                RoundtripReencoder.parse_type_section(&mut types, reader.clone())?;
                state.trap_type = count;
                types.ty().function([], []);
                count += 1;
                for results in several_results {
                    if let std::collections::hash_map::Entry::Vacant(entry) =
                        state.block_types.entry(results)
                    {
                        let encoded = entry
                            .key()
                            .iter()
                            .map(|ty| RoundtripReencoder.val_type(*ty))
                            .collect::<Result<Vec<_>, _>>()?;
                        types.ty().function([], encoded);
                        entry.insert(count);
                        count += 1;
                    }
                }
                out.section(&types);
            }
            Payload::ImportSection(reader) => {
                for import in reader.clone().into_imports() {
                    match import?.ty {
                        wasmparser::TypeRef::Func(_) | wasmparser::TypeRef::FuncExact(_) => {
                            state.imported_functions += 1
                        }
                        wasmparser::TypeRef::Global(_) => state.imported_globals += 1,
                        _ => {}
                    }
                }
                copy_section(&mut out, wasm, &payload);
            }
            Payload::FunctionSection(reader) => {
                let mut functions = wasm_encoder::FunctionSection::new();
                for ty in reader.clone() {
                    functions.function(ty?);
                    state.defined_functions += 1;
                }
                functions.function(state.trap_type);
                out.section(&functions);
            }
            Payload::GlobalSection(reader) => {
                let mut globals = wasm_encoder::GlobalSection::new();
                RoundtripReencoder.parse_global_section(&mut globals, reader.clone())?;
                globals_defined = reader.count();
                emit_height_global(&mut out, &mut state, globals, globals_defined);
            }
            Payload::ExportSection(_)
            | Payload::StartSection { .. }
            | Payload::ElementSection(_)
            | Payload::DataCountSection { .. }
            | Payload::DataSection(_) => {
                if !state.global_emitted {
                    let globals = wasm_encoder::GlobalSection::new();
                    emit_height_global(&mut out, &mut state, globals, globals_defined);
                }
                copy_section(&mut out, wasm, &payload);
            }
            Payload::CodeSectionStart { count, .. } => {
                if !state.global_emitted {
                    let globals = wasm_encoder::GlobalSection::new();
                    emit_height_global(&mut out, &mut state, globals, globals_defined);
                }
                code = Some((wasm_encoder::CodeSection::new(), *count));
            }
            Payload::CodeSectionEntry(body) => {
                let ValidPayload::Func(func, _) = valid else {
                    return Err(InstrumentError::Invalid(
                        "a function body out of place".into(),
                    ));
                };
                let Some((section, remaining)) = code.as_mut() else {
                    return Err(InstrumentError::Invalid(
                        "a function body out of place".into(),
                    ));
                };
                let rewritten = instrument_body(wasm, body, func, &state, limit)?;
                section.raw(&rewritten);
                *remaining -= 1;
                if *remaining == 0 {
                    section.raw(&trap_body());
                    out.section(&*section);
                }
            }
            Payload::End(_) => {
                let mut names = wasm_encoder::NameMap::new();
                names.append(state.trap_function(), TRAP_FUNCTION_NAME);
                let mut section = wasm_encoder::NameSection::new();
                section.functions(&names);
                out.section(&section);
            }
            _ => copy_section(&mut out, wasm, &payload),
        }
    }
    Ok(out.finish())
}

/// Whether the module has a non-empty function section.
fn defines_functions(wasm: &[u8]) -> Result<bool, InstrumentError> {
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::FunctionSection(reader) = payload? {
            return Ok(reader.count() > 0);
        }
    }
    Ok(false)
}

/// Writes the global section: the module's own globals, then the height.
fn emit_height_global(
    out: &mut wasm_encoder::Module,
    state: &mut ModuleState,
    mut globals: wasm_encoder::GlobalSection,
    defined: u32,
) {
    globals.global(
        wasm_encoder::GlobalType {
            val_type: wasm_encoder::ValType::I32,
            mutable: true,
            shared: false,
        },
        &wasm_encoder::ConstExpr::i32_const(0),
    );
    state.height_global = state.imported_globals + defined;
    state.global_emitted = true;
    out.section(&globals);
}

fn copy_section(out: &mut wasm_encoder::Module, wasm: &[u8], payload: &Payload<'_>) {
    if let Some((id, range)) = payload.as_section() {
        out.section(&wasm_encoder::RawSection {
            id,
            data: &wasm[range],
        });
    }
}

/// The body of the trap function: `unreachable`.
fn trap_body() -> Vec<u8> {
    // No locals, `unreachable`, `end`.
    vec![0x00, 0x00, 0x0b]
}

/// Validates one function body and returns its type and its cost.
fn measure_body(
    body: &wasmparser::FunctionBody<'_>,
    func: wasmparser::FuncToValidate<wasmparser::ValidatorResources>,
) -> Result<(wasmparser::FuncType, u64), InstrumentError> {
    use wasmparser::WasmModuleResources as _;

    let ty = func
        .resources
        .sub_type_at(func.ty)
        .and_then(|sub| match &sub.composite_type.inner {
            wasmparser::CompositeInnerType::Func(func) => Some(func.clone()),
            _ => None,
        })
        .ok_or_else(|| InstrumentError::Invalid("a function without a function type".into()))?;
    let mut validator = func.into_validator(Default::default());

    let mut locals = 0u64;
    let mut locals_reader = body.get_locals_reader()?;
    for _ in 0..locals_reader.get_count() {
        let offset = locals_reader.original_position();
        let (count, ty) = locals_reader.read()?;
        validator.define_locals(offset, count, ty)?;
        locals += u64::from(count);
    }
    let mut max_height = 0u64;
    let mut instructions = 0u64;
    let mut operators = body.get_operators_reader()?;
    while !operators.eof() {
        let (operator, offset) = operators.read_with_offset()?;
        refuse_unsupported(&operator)?;
        validator.op(offset, &operator)?;
        max_height = max_height.max(u64::from(validator.operand_stack_height()));
        instructions += 1;
    }
    operators.finish()?;
    let cost = function_cost(ty.params().len() as u64, locals, max_height, instructions);
    Ok((ty, cost))
}

/// Validates one function body, computes its cost and returns the body with
/// the prologue, the wrapping block and the epilogues.
fn instrument_body(
    wasm: &[u8],
    body: &wasmparser::FunctionBody<'_>,
    func: wasmparser::FuncToValidate<wasmparser::ValidatorResources>,
    state: &ModuleState,
    limit: u32,
) -> Result<Vec<u8>, InstrumentError> {
    use wasm_encoder::Instruction as I;

    let (ty, cost) = measure_body(body, func)?;
    let code_start = body.get_operators_reader()?.original_position();
    // A cost above the limit traps at every call; clamping keeps the sum
    // within `u32` (the limit is at most `i32::MAX`).
    let cost = cost.min(u64::from(limit) + 1) as u32 as i32;
    let limit = limit.min(i32::MAX as u32) as i32;
    let height = state.height_global;

    let mut out = wasm[body.range().start..code_start].to_vec();
    let mut emit = |instruction: I<'_>| wasm_encoder::Encode::encode(&instruction, &mut out);
    // Prologue.
    emit(I::GlobalGet(height));
    emit(I::I32Const(cost));
    emit(I::I32Add);
    emit(I::GlobalSet(height));
    emit(I::GlobalGet(height));
    emit(I::I32Const(limit));
    emit(I::I32GtU);
    emit(I::If(wasm_encoder::BlockType::Empty));
    emit(I::Call(state.trap_function()));
    emit(I::End);
    let block_type = match ty.results() {
        [] => wasm_encoder::BlockType::Empty,
        [one] => wasm_encoder::BlockType::Result(RoundtripReencoder.val_type(*one)?),
        several => wasm_encoder::BlockType::FunctionType(
            *state
                .block_types
                .get(several)
                .ok_or_else(|| InstrumentError::Invalid("a result type out of place".into()))?,
        ),
    };
    emit(I::Block(block_type));

    let epilogue = |out: &mut Vec<u8>| {
        for instruction in [
            I::GlobalGet(height),
            I::I32Const(cost),
            I::I32Sub,
            I::GlobalSet(height),
        ] {
            wasm_encoder::Encode::encode(&instruction, out);
        }
    };
    // The original code, copied byte for byte; its final `end` closes the
    // wrapping block.
    let mut operators = body.get_operators_reader()?;
    while !operators.eof() {
        let start = operators.original_position();
        let operator = operators.read()?;
        if matches!(
            operator,
            Operator::Return
                | Operator::ReturnCall { .. }
                | Operator::ReturnCallIndirect { .. }
                | Operator::ReturnCallRef { .. }
        ) {
            epilogue(&mut out);
        }
        out.extend_from_slice(&wasm[start..operators.original_position()]);
    }
    epilogue(&mut out);
    wasm_encoder::Encode::encode(&I::End, &mut out);
    Ok(out)
}

/// Refuses the instructions that leave a function without its epilogue.
fn refuse_unsupported(operator: &Operator<'_>) -> Result<(), InstrumentError> {
    match operator {
        Operator::TryTable { .. }
        | Operator::Throw { .. }
        | Operator::ThrowRef
        | Operator::Try { .. }
        | Operator::Catch { .. }
        | Operator::CatchAll
        | Operator::Rethrow { .. }
        | Operator::Delegate { .. } => Err(InstrumentError::Unsupported("exception handling")),
        Operator::ContNew { .. }
        | Operator::ContBind { .. }
        | Operator::Suspend { .. }
        | Operator::Resume { .. }
        | Operator::ResumeThrow { .. }
        | Operator::ResumeThrowRef { .. }
        | Operator::Switch { .. } => Err(InstrumentError::Unsupported("stack switching")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::{Config, Engine, Instance, Module, Store};

    fn engine(stack_bytes: usize) -> Engine {
        let mut config = Config::new();
        config.max_wasm_stack(stack_bytes);
        Engine::new(&config).expect("the engine starts")
    }

    /// What a call of `run(n)` did: its result or trap, and the frames of
    /// `$f` it entered (the `depth` global, when the module has one).
    struct Ran {
        result: Result<i32, wasmtime::Error>,
        depth: Option<i32>,
    }

    /// Instruments `wasm` with `limit` and calls its `run(n)` export on an
    /// engine with `stack_bytes` of native stack, on a thread with room.
    fn run(wasm: &[u8], limit: u32, stack_bytes: usize, n: i32) -> Ran {
        let instrumented = instrument(wasm, limit).expect("instruments");
        on_big_stack(move || {
            let engine = engine(stack_bytes);
            let module = Module::new(&engine, &instrumented).expect("compiles");
            let mut store = Store::new(&engine, ());
            let instance = Instance::new(&mut store, &module, &[]).expect("instantiates");
            let run = instance
                .get_typed_func::<i32, i32>(&mut store, "run")
                .expect("exports run");
            let result = run.call(&mut store, n);
            let depth = instance
                .get_global(&mut store, "depth")
                .and_then(|global| global.get(&mut store).i32());
            Ran { result, depth }
        })
    }

    fn is_limit_trap(result: &Result<i32, wasmtime::Error>) -> bool {
        matches!(result, Err(error) if crate::runtime::instance::hit_stack_limit(error))
    }

    /// Runs on a thread with room for any backstop the tests use.
    fn on_big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(16 << 20)
            .spawn(f)
            .expect("spawns")
            .join()
            .expect("does not panic")
    }

    /// A function `$f(n)` that recurses `n` times, counting the frames it
    /// enters in the exported global `depth`, written to make the compiled
    /// frame large for its cost in one way (`kind`); `run(n)` calls it.
    fn shape(kind: &str) -> String {
        let enter = "(global.set $depth (i32.add (global.get $depth) (i32.const 1)))";
        let stop = "(if (i32.eqz (local.get $n)) (then (return (i32.const 0))))";
        let recurse = "(call $f (i32.sub (local.get $n) (i32.const 1)))";
        let repeat = |count: usize, item: &dyn Fn(usize) -> String| -> String {
            (0..count).map(item).collect()
        };
        let body = match kind {
            "trivial" => format!("{enter} {stop} {recurse} (i32.add (local.get $n))"),
            // Loads cannot move across the call, so every local is live
            // across it.
            "i64 locals" => format!(
                "{} {enter} {stop} {} (i64.extend_i32_u {recurse}) {} i32.wrap_i64",
                repeat(32, &|i| format!("(local $l{i} i64)")),
                repeat(32, &|i| format!(
                    "(local.set $l{i} (i64.load offset={} (i32.const 0)))",
                    8 * i
                )),
                repeat(32, &|i| format!("(i64.add (local.get $l{i}))")),
            ),
            "v128 locals" => format!(
                "{} {enter} {stop} {} (i32x4.splat {recurse}) {} i32x4.extract_lane 0",
                repeat(32, &|i| format!("(local $v{i} v128)")),
                repeat(32, &|i| format!(
                    "(local.set $v{i} (v128.load offset={} (i32.const 0)))",
                    16 * i
                )),
                repeat(32, &|i| format!("(v128.xor (local.get $v{i}))")),
            ),
            "operands" => format!(
                "{enter} {stop} {} (i32x4.splat {recurse}) {} i32x4.extract_lane 0",
                repeat(32, &|i| format!(
                    "(v128.load offset={} (i32.const 0))",
                    16 * i
                )),
                "v128.xor ".repeat(32),
            ),
            // The same pure values computed before and after the call: the
            // compiler computes each once and keeps it across the call,
            // although the wasm code holds none of them.
            "common subexpressions" => {
                let values = repeat(32, &|i| {
                    format!(
                        "(i32x4.mul (i32x4.splat (local.get $n)) (v128.const i32x4 {i} 1 2 3)) v128.xor "
                    )
                });
                format!(
                    "{enter} {stop} (i32.const 0) (v128.const i64x2 0 0) {values} v128.store {recurse} (i32x4.splat) {values} i32x4.extract_lane 0"
                )
            }
            "many params" => {
                let params = repeat(24, &|i| format!("(local.get $p{i})"));
                let sum = repeat(24, &|i| format!("(i64.add (local.get $p{i}))"));
                return format!(
                    r#"(module
                         (global $depth (export "depth") (mut i32) (i32.const 0))
                         (func $f (param $n i32) {} (result i32)
                           {enter} {stop}
                           (call $f (i32.sub (local.get $n) (i32.const 1)) {params})
                           (i64.extend_i32_u) {sum} i32.wrap_i64)
                         (func (export "run") (param $n i32) (result i32)
                           (call $f (local.get $n) {})))"#,
                    repeat(24, &|i| format!("(param $p{i} i64)")),
                    repeat(24, &|i| format!("(i64.const {i})")),
                );
            }
            other => panic!("unknown shape {other}"),
        };
        format!(
            r#"(module
                 (memory 1)
                 (global $depth (export "depth") (mut i32) (i32.const 0))
                 (func $f (param $n i32) (result i32) {body})
                 (func (export "run") (param $n i32) (result i32) (call $f (local.get $n))))"#
        )
    }

    const SHAPES: [&str; 6] = [
        "trivial",
        "i64 locals",
        "v128 locals",
        "operands",
        "common subexpressions",
        "many params",
    ];

    /// The cost of every defined function of `wasm`, in order.
    fn function_costs(wasm: &[u8]) -> Vec<u64> {
        let mut validator = Validator::new_with_features(WasmFeatures::all());
        let mut costs = Vec::new();
        for payload in Parser::new(0).parse_all(wasm) {
            let payload = payload.expect("parses");
            if let ValidPayload::Func(func, body) = validator.payload(&payload).expect("valid") {
                costs.push(measure_body(&body, func).expect("measures").1);
            }
        }
        costs
    }

    /// The largest `n` for which `run(n)` of a `shape` stays within
    /// `limit`: `run` and `n + 1` frames of `$f`.
    fn deepest(costs: &[u64], limit: u32) -> i32 {
        let (f, run) = (costs[0], costs[1]);
        ((u64::from(limit) - run) / f - 1) as i32
    }

    #[test]
    fn recursion_stops_exactly_at_the_limit() {
        let wasm = wat::parse_str(shape("trivial")).expect("valid wat");
        // $f: 1 parameter, no locals, height 2, 17 instructions; run: 1
        // parameter, height 1, 3 instructions.
        let costs = function_costs(&wasm);
        assert_eq!(
            costs,
            [function_cost(1, 0, 2, 17), function_cost(1, 0, 1, 3)]
        );
        let limit = 1000;
        let n = deepest(&costs, limit);
        assert_eq!(costs[1] + (n as u64 + 1) * costs[0], 991);

        // The same boundary with the smallest allowed native stack and with
        // four times as much: the native stack plays no part.
        for stack in [native_stack_bytes(limit), 4 * native_stack_bytes(limit)] {
            let within = run(&wasm, limit, stack, n);
            assert_eq!(within.result.expect("within the limit"), n * (n + 1) / 2);
            assert_eq!(within.depth, Some(n + 1));

            let beyond = run(&wasm, limit, stack, n + 1);
            assert!(is_limit_trap(&beyond.result), "{:?}", beyond.result);
            // The frame that would pass the limit traps in its prologue.
            assert_eq!(beyond.depth, Some(n + 1));
        }
    }

    /// Every way out of a function gives its units back: a loop that calls
    /// functions leaving by each exit many times never reaches a limit that
    /// a few frames fill.
    #[test]
    fn every_exit_gives_back_its_units() {
        let wat = r#"(module
            (type $unary (func (param i32) (result i32)))
            (table 1 funcref)
            (elem (i32.const 0) $indirect)
            ;; Leaves by `br_if` (x = 0) and `br_table` (x = 1) to the
            ;; function's label from nested blocks, by `return` from a nested
            ;; block (x = 3) and by the end (otherwise), with two results.
            (func $exits (param $x i32) (result i32 i64)
              block $a (result i32 i64)
                block $b (result i32 i64)
                  i32.const 1
                  i64.const 1
                  local.get $x
                  i32.eqz
                  br_if 2
                  drop
                  drop
                  local.get $x
                  i32.const 3
                  i32.eq
                  if
                    block
                      i32.const 3
                      i64.const 3
                      return
                    end
                  end
                  i32.const 2
                  i64.const 2
                  local.get $x
                  i32.const 1
                  i32.sub
                  br_table 2 0 1
                end
              end)
            (func $indirect (param $x i32) (result i32) (local.get $x))
            ;; Tail-calls itself `x` times.
            (func $tail (param $x i32) (result i32)
              (if (i32.eqz (local.get $x)) (then (return (i32.const 0))))
              (return_call $tail (i32.sub (local.get $x) (i32.const 1))))
            (func (export "run") (param $n i32) (result i32) (local $sum i32)
              (loop $again
                local.get $sum
                (call $exits (i32.rem_u (local.get $n) (i32.const 5)))
                i32.wrap_i64
                i32.add
                i32.add
                local.set $sum
                (local.set $sum (i32.add (local.get $sum)
                  (call_indirect (type $unary) (local.get $n) (i32.const 0))))
                (local.set $sum (i32.add (local.get $sum) (call $tail (i32.const 1000))))
                (br_if $again (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))
              (local.get $sum)))"#;
        let wasm = wat::parse_str(wat).expect("valid wat");
        let costs = function_costs(&wasm);
        // Room for `run` and one callee, not for two frames of any.
        let limit = (costs[3] + costs[0].max(costs[1]).max(costs[2])) as u32;
        let ran = run(&wasm, limit, native_stack_bytes(limit), 10_000);
        ran.result.expect("no frame is left counted");

        let too_small = run(&wasm, limit - 1, native_stack_bytes(limit), 10_000);
        assert!(is_limit_trap(&too_small.result), "{:?}", too_small.result);
    }

    #[test]
    fn recursion_through_call_indirect_is_counted() {
        let wat = r#"(module
            (type $unary (func (param i32) (result i32)))
            (table 1 funcref)
            (elem (i32.const 0) $f)
            (global $depth (export "depth") (mut i32) (i32.const 0))
            (func $f (param $n i32) (result i32)
              (global.set $depth (i32.add (global.get $depth) (i32.const 1)))
              (if (result i32) (local.get $n)
                (then (call_indirect (type $unary) (i32.sub (local.get $n) (i32.const 1)) (i32.const 0)))
                (else (i32.const 0))))
            (func (export "run") (param $n i32) (result i32)
              (call_indirect (type $unary) (local.get $n) (i32.const 0))))"#;
        let wasm = wat::parse_str(wat).expect("valid wat");
        let costs = function_costs(&wasm);
        let limit = 500;
        let n = deepest(&costs, limit);
        let within = run(&wasm, limit, native_stack_bytes(limit), n);
        assert_eq!(within.result.expect("within the limit"), 0);
        let beyond = run(&wasm, limit, native_stack_bytes(limit), n + 1);
        assert!(is_limit_trap(&beyond.result), "{:?}", beyond.result);
        assert_eq!(beyond.depth, Some(n + 1));
    }

    #[test]
    fn exception_handling_is_refused() {
        let wasm = wat::parse_str(
            r#"(module (tag $oops) (func (export "run") (param i32) (result i32) (throw $oops)))"#,
        )
        .expect("valid wat");
        let error = instrument(&wasm, 1000).expect_err("refused");
        assert!(
            matches!(error, InstrumentError::Unsupported("exception handling")),
            "{error}"
        );
    }

    #[test]
    fn deeply_nested_components_are_refused() {
        let mut component = wasm_encoder::Component::new().finish();
        for _ in 0..1000 {
            let mut outer = wasm_encoder::Component::new();
            outer.section(&wasm_encoder::RawSection {
                id: wasm_encoder::ComponentSectionId::Component as u8,
                data: &component,
            });
            component = outer.finish();
        }
        assert!(matches!(
            instrument(&component, 1000),
            Err(InstrumentError::Unsupported(
                "components nested more than 100 deep"
            ))
        ));
    }

    #[test]
    fn invalid_code_is_refused_not_rewritten() {
        // `i32.add` with nothing on the stack.
        let wasm = wat::parse_str(r#"(module (func i32.add drop))"#);
        // The text parser accepts it; the validator must not.
        let wasm = wasm.expect("parses");
        assert!(matches!(
            instrument(&wasm, 1000),
            Err(InstrumentError::Invalid(_))
        ));
    }

    /// The same bytes give the same output, for a core module and for the
    /// bundled guest as the runtime makes it a component; instrumenting an
    /// instrumented module again only counts its frames twice, so it stops
    /// no later.
    #[test]
    fn rewrite_is_deterministic_and_may_be_repeated() {
        let component = crate::runtime::module::componentize(crate::runtime::BUNDLED_GUEST)
            .expect("the bundled guest is a valid core module");
        let once = instrument(&component, 1000).expect("instruments");
        assert_eq!(once, instrument(&component, 1000).expect("instruments"));
        let mut validator = Validator::new_with_features(WasmFeatures::all());
        validator.validate_all(&once).expect("the result is valid");

        let wasm = wat::parse_str(shape("trivial")).expect("valid wat");
        let once = instrument(&wasm, 1000).expect("instruments");
        assert_eq!(once, instrument(&wasm, 1000).expect("instruments"));
        let n = deepest(&function_costs(&wasm), 1000);
        let twice = run(&once, 1000, native_stack_bytes(1000), n + 1);
        assert!(is_limit_trap(&twice.result), "{:?}", twice.result);
        assert!(twice.depth.is_some_and(|depth| depth <= n + 1));
    }

    /// The native backstop never fires first: for each shape, at the
    /// default limit and the smallest native stack allowed for it, deep
    /// recursion ends at the deterministic limit.
    #[test]
    fn deterministic_limit_fires_before_the_native_backstop() {
        let limit = crate::runtime::Limits::default().stack_units;
        for kind in SHAPES {
            let wasm = wat::parse_str(shape(kind)).expect("valid wat");
            let ran = run(&wasm, limit, native_stack_bytes(limit), i32::MAX);
            assert!(is_limit_trap(&ran.result), "{kind}: {:?}", ran.result);
            let message = crate::runtime::instance::describe_failure(
                ran.result.expect_err("traps"),
                None,
                0,
                limit,
            )
            .expect("a refusal, not a host fault");
            assert!(message.contains("call stack exhausted"), "{message}");
        }
    }

    /// The margin behind [`NATIVE_BYTES_PER_UNIT`]: with no unit limit, the
    /// native frames of each shape use at most half the bytes per unit the
    /// backstop allows. A native overflow is a host fault.
    #[test]
    fn native_frames_stay_within_half_the_bytes_per_unit() {
        let stack = 1 << 20;
        for kind in SHAPES {
            let wasm = wat::parse_str(shape(kind)).expect("valid wat");
            let ran = run(&wasm, i32::MAX as u32, stack, i32::MAX);
            let depth = ran.depth.expect("counts frames") as usize;
            let cost = function_costs(&wasm)[0] as usize;
            assert!(
                stack / depth <= cost * NATIVE_BYTES_PER_UNIT / 2,
                "{kind}: {} native bytes per frame of {cost} units",
                stack / depth
            );
            let error = ran.result.expect_err("overflows the native stack");
            assert_eq!(
                error.downcast_ref::<wasmtime::Trap>(),
                Some(&wasmtime::Trap::StackOverflow)
            );
            assert!(crate::runtime::instance::describe_failure(error, None, 0, 0).is_err());
        }
    }

    #[test]
    fn native_stack_below_the_bound_is_refused() {
        let limits = crate::runtime::Limits {
            stack_bytes: 64 << 10,
            ..Default::default()
        };
        assert!(crate::runtime::GuestRuntime::new(limits, None).is_err());
    }
}
