//! A bounded, safe reader of `torch.save` zip checkpoints that hold a plain state dict
//! (name → tensor): PEFT's `adapter_model.bin`, `pytorch_model*.bin` shards, LLaVA's
//! `mm_projector.bin`, CoIN's `non_lora_trainables.bin`. Such files come from strangers.
//!
//! The archive is a zip (entries stored uncompressed, as torch writes them) with one folder
//! `<prefix>/`: `data.pkl` (a pickle of the state dict), `data/<key>` (the raw storages),
//! `byteorder` (`little`), `version` and a few entries that are not read.
//!
//! The pickle is interpreted, never executed: only the opcodes torch's writer emits for a state
//! dict are known (protocol 2), and `GLOBAL`s are matched against a short allow-list
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`,
//! `_rebuild_parameter_with_state`, the `torch.*Storage` types) and become tags: nothing is
//! imported or called. Any other opcode or name is an error naming the file, the byte and the
//! opcode or name. The interpreter is one loop over explicit stacks (no recursion, and objects
//! live in a flat arena, so even dropping them never recurses), and every quantity the file
//! declares is bounded by [`Limits`]: the size of `data.pkl`, nested MARKs, stack and memo
//! entries, bytes allocated while unpickling, string length, number of tensors and rank. Each
//! tensor must lie inside its storage and each storage inside its zip entry, inside the file.
//!
//! [`TorchZip::open`] checks all of that before returning, per tensor, its name, dtype, shape,
//! strides, storage key and offset; [`TorchZip::read_tensor`] then reads one tensor's bytes
//! (row-major, little-endian) straight out of the stored zip entry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::Dtype;

/// Bounds on what a checkpoint may declare. The defaults are far above what real state dicts
/// need (a 7B shard's `data.pkl` is ~100 KB, nests MARKs 3 deep and holds a few hundred
/// tensors) and far below what would exhaust memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest `data.pkl`, in bytes.
    pub max_pickle_bytes: u64,
    /// Deepest nesting of MARKs.
    pub max_marks: usize,
    /// Most values on the unpickling stack.
    pub max_stack: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Most bytes allocated for objects and strings while unpickling.
    pub max_alloc_bytes: u64,
    /// Longest string, in bytes.
    pub max_string_bytes: usize,
    /// Most tensors (rebuilt, and named in the state dict).
    pub max_tensors: usize,
    /// Most dimensions of a tensor.
    pub max_rank: usize,
    /// Most entries in the zip archive.
    pub max_entries: usize,
    /// The bytes of all tensors together may be at most this many times the bytes of all
    /// storages (tensors sharing a storage, as tied weights do, count once each).
    pub max_expansion: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pickle_bytes: 64 << 20,
            max_marks: 1024,
            max_stack: 1 << 20,
            max_memo: 1 << 20,
            max_alloc_bytes: 256 << 20,
            max_string_bytes: 1 << 20,
            max_tensors: 1 << 18,
            max_rank: 64,
            max_entries: (1 << 18) + 64,
            max_expansion: 4,
        }
    }
}

/// One tensor of the state dict, as declared by `data.pkl` and checked against its storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchTensor {
    /// The state-dict key.
    pub name: String,
    /// The element type (from the storage type).
    pub dtype: Dtype,
    /// Size per dimension.
    pub shape: Vec<usize>,
    /// Stride per dimension, in elements.
    pub strides: Vec<usize>,
    /// The storage key (the zip entry is `<prefix>/data/<key>`).
    pub storage: String,
    /// Offset of the first element inside the storage, in elements.
    pub offset: u64,
}

impl TorchTensor {
    /// Number of elements (checked not to overflow when the file was opened; saturates for a
    /// tensor built by hand).
    pub fn numel(&self) -> u64 {
        self.shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .unwrap_or(u64::MAX)
    }

    /// Bytes of the tensor read contiguously.
    pub fn byte_len(&self) -> u64 {
        self.numel()
            .saturating_mul(self.dtype.size_in_bytes() as u64)
    }

    /// Offset of the first element inside the storage, in bytes.
    pub fn byte_offset(&self) -> u64 {
        self.offset
            .saturating_mul(self.dtype.size_in_bytes() as u64)
    }

    /// Whether the elements are laid out row-major without gaps (dimensions of size 1 may have
    /// any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut want = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != want {
                return false;
            }
            want = want.saturating_mul(d);
        }
        true
    }
}

/// Where a storage lies in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageSpan {
    /// Offset of the first byte in the file.
    pub file_offset: u64,
    /// Bytes the storage holds (`numel` elements of `dtype`).
    pub len: u64,
    /// Element type.
    pub dtype: Dtype,
    /// Number of elements.
    pub numel: u64,
}

/// Why a checkpoint cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// The file could not be opened or read.
    #[error("could not read '{path}'")]
    Io {
        /// The checkpoint.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The zip structure is broken (truncated, damaged, or a feature torch never writes).
    #[error(
        "'{path}' is not a readable zip archive (truncated or damaged); re-download or re-save it"
    )]
    Zip {
        /// The checkpoint.
        path: PathBuf,
        /// What the zip reader found.
        #[source]
        source: zip::result::ZipError,
    },
    /// The file is not a state dict this reader accepts.
    #[error(
        "'{path}' is not a PyTorch checkpoint coin reads: {problem} (coin reads torch.save zip \
         files of a plain name → tensor dict and runs nothing from them; re-save the state dict \
         or convert it to safetensors)"
    )]
    Invalid {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        problem: Problem,
    },
}

impl PickleError {
    /// The problem, for an invalid file.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            PickleError::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// What is wrong with a checkpoint. Names from the file are escaped (`escape_debug`) and cut to
/// 200 characters. Byte positions are offsets in `data.pkl`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Not a zip archive; `legacy` when it looks like torch's pre-1.6 format.
    NotZip {
        /// Whether it starts like a legacy torch.save pickle.
        legacy: bool,
    },
    /// An entry name that is not a plain relative name inside the one folder.
    EntryName {
        /// The name.
        name: String,
    },
    /// Two entries with the same name.
    DuplicateEntry,
    /// No `<prefix>/data.pkl`.
    NoPickle,
    /// An entry that is compressed or encrypted.
    NotStored {
        /// The entry.
        entry: String,
    },
    /// An entry whose data lies outside the file.
    EntryOutsideFile {
        /// The entry.
        entry: String,
    },
    /// `byteorder` is not `little`.
    ByteOrder {
        /// What it says.
        found: String,
    },
    /// `data.pkl` ends inside an opcode or before STOP.
    Truncated {
        /// Where.
        pos: usize,
    },
    /// An opcode this reader does not interpret.
    Opcode {
        /// The opcode byte.
        op: u8,
        /// Where.
        pos: usize,
    },
    /// A GLOBAL outside the allow-list (never resolved).
    Global {
        /// `module.name`.
        name: String,
        /// Where.
        pos: usize,
    },
    /// A bound of [`Limits`] exceeded.
    Limit {
        /// Which bound.
        what: &'static str,
        /// Its value.
        limit: u64,
        /// Where in data.pkl, when it is inside data.pkl.
        pos: Option<usize>,
    },
    /// The tensors hold more bytes than [`Limits::max_expansion`] times their storages.
    Expansion {
        /// The factor.
        limit: u64,
    },
    /// The pickle is well-formed bytes but not what torch writes.
    Malformed {
        /// What was wrong.
        what: String,
        /// Where.
        pos: usize,
    },
    /// The pickle's result is not a dict.
    NotADict,
    /// A state-dict key that appears twice.
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A state-dict value that is not a tensor.
    NotATensor {
        /// The key.
        key: String,
    },
    /// A storage key that is not a short plain name.
    StorageKey {
        /// The key.
        key: String,
    },
    /// One storage declared with two dtypes or sizes.
    StorageConflict {
        /// The key.
        key: String,
    },
    /// A storage named by data.pkl has no entry.
    MissingStorage {
        /// The key.
        key: String,
    },
    /// A storage entry holds fewer bytes than the storage declares.
    StorageTooSmall {
        /// The key.
        key: String,
        /// Bytes declared.
        declared: u64,
        /// Bytes in the entry.
        actual: u64,
    },
    /// A tensor that reaches outside its storage, overflows, or holds more elements than its
    /// storage.
    TensorOutOfStorage {
        /// The tensor.
        name: String,
        /// Details.
        what: String,
    },
}

/// Escape and cut a name taken from a file, for messages.
fn esc(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(200)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().nth(200).is_some() {
        out.push('…');
    }
    out
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "an unknown opcode",
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotZip { legacy: true } => write!(
                f,
                "it is in torch's legacy (pre-1.6) format, which is not read"
            ),
            Problem::NotZip { legacy: false } => write!(f, "it is not a zip archive"),
            Problem::EntryName { name } => write!(
                f,
                "the zip entry '{name}' is not a plain relative name inside the archive's folder"
            ),
            Problem::DuplicateEntry => write!(f, "two zip entries have the same name"),
            Problem::NoPickle => write!(f, "it has no '<folder>/data.pkl' entry"),
            Problem::NotStored { entry } => write!(
                f,
                "the zip entry '{entry}' is compressed or encrypted (torch.save stores entries as they are)"
            ),
            Problem::EntryOutsideFile { entry } => {
                write!(f, "the zip entry '{entry}' reaches past the end of the file")
            }
            Problem::ByteOrder { found } => write!(
                f,
                "its byteorder is '{found}' (only little-endian checkpoints are read)"
            ),
            Problem::Truncated { pos } => write!(f, "data.pkl ends early, at byte {pos}"),
            Problem::Opcode { op, pos } => write!(
                f,
                "data.pkl uses the pickle opcode {} (0x{op:02x}) at byte {pos}, which a state dict does not need",
                opcode_name(*op)
            ),
            Problem::Global { name, pos } => write!(
                f,
                "data.pkl refers to '{name}' at byte {pos}, which is not a tensor type or function coin knows (it was not imported or called)"
            ),
            Problem::Limit {
                what,
                limit,
                pos: Some(pos),
            } => write!(
                f,
                "data.pkl exceeds the limit of {limit} {what} (at byte {pos})"
            ),
            Problem::Limit {
                what,
                limit,
                pos: None,
            } => write!(f, "it exceeds the limit of {limit} {what}"),
            Problem::Expansion { limit } => write!(
                f,
                "its tensors hold more than {limit} times the bytes of its storages (too many \
                 tensors share storages)"
            ),
            Problem::Malformed { what, pos } => write!(f, "data.pkl is malformed at byte {pos}: {what}"),
            Problem::NotADict => write!(f, "data.pkl does not hold a dict"),
            Problem::DuplicateKey { key } => write!(f, "the key '{key}' appears twice"),
            Problem::NotATensor { key } => write!(f, "the entry '{key}' is not a tensor"),
            Problem::StorageKey { key } => write!(f, "the storage key '{key}' is not a plain name"),
            Problem::StorageConflict { key } => write!(
                f,
                "the storage '{key}' is declared with two different types or sizes"
            ),
            Problem::MissingStorage { key } => {
                write!(f, "the storage '{key}' has no 'data/{key}' entry")
            }
            Problem::StorageTooSmall {
                key,
                declared,
                actual,
            } => write!(
                f,
                "the storage '{key}' declares {declared} bytes but its entry holds {actual}"
            ),
            Problem::TensorOutOfStorage { name, what } => {
                write!(f, "the tensor '{name}' {what}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pickle interpreter.

/// The callables and types data.pkl may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(Dtype),
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", storage) => Global::Storage(match storage {
            "FloatStorage" => Dtype::F32,
            "DoubleStorage" => Dtype::F64,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" => Dtype::U8,
            "BoolStorage" => Dtype::BOOL,
            _ => return None,
        }),
        _ => return None,
    })
}

#[derive(Clone, Debug)]
enum Val {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(Rc<str>),
    Obj(usize),
    Global(Global),
}

impl Val {
    fn kind(&self) -> &'static str {
        match self {
            Val::None => "None",
            Val::Bool(_) => "a bool",
            Val::Int(_) => "an int",
            Val::Float => "a float",
            Val::Str(_) => "a string",
            Val::Obj(_) => "an object",
            Val::Global(_) => "a class or function",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Key {
    None,
    Bool(bool),
    Int(i64),
    Str(Rc<str>),
}

#[derive(Debug, Default)]
struct Dict {
    items: Vec<(Val, Val)>,
    keys: HashSet<Key>,
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Dict),
    Storage(Rc<str>),
    Tensor(usize),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::Tuple(_) => "a tuple",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Storage(_) => "a storage",
            Obj::Tensor(_) => "a tensor",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct StorageDecl {
    dtype: Dtype,
    numel: u64,
}

#[derive(Debug)]
struct Rebuilt {
    storage: Rc<str>,
    offset: u64,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// What data.pkl declares.
#[derive(Debug, Default)]
struct StateDict {
    tensors: Vec<TorchTensor>,
    storages: BTreeMap<String, (Dtype, u64)>,
}

const VAL_BYTES: u64 = std::mem::size_of::<Val>() as u64;
const OBJ_BYTES: u64 = std::mem::size_of::<Obj>() as u64 + 16;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    limits: &'a Limits,
    stack: Vec<Val>,
    marks: Vec<usize>,
    memo: HashMap<u32, Val>,
    objs: Vec<Obj>,
    allocated: u64,
    storages: BTreeMap<Rc<str>, StorageDecl>,
    rebuilt: Vec<Rebuilt>,
}

type PResult<T> = std::result::Result<T, Problem>;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], limits: &'a Limits) -> Self {
        Machine {
            data,
            pos: 0,
            op_pos: 0,
            limits,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objs: Vec::new(),
            allocated: 0,
            storages: BTreeMap::new(),
            rebuilt: Vec::new(),
        }
    }

    fn malformed(&self, what: impl Into<String>) -> Problem {
        Problem::Malformed {
            what: what.into(),
            pos: self.op_pos,
        }
    }

    fn limit(&self, what: &'static str, limit: u64) -> Problem {
        Problem::Limit {
            what,
            limit,
            pos: Some(self.op_pos),
        }
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(Problem::Truncated {
                pos: self.data.len(),
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn charge(&mut self, bytes: u64) -> PResult<()> {
        self.allocated = self.allocated.saturating_add(bytes);
        if self.allocated > self.limits.max_alloc_bytes {
            return Err(self.limit("bytes allocated", self.limits.max_alloc_bytes));
        }
        Ok(())
    }

    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Val) -> PResult<()> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(self.limit("values on the stack", self.limits.max_stack as u64));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> PResult<Val> {
        if self.stack.len() <= self.base() {
            return Err(self.malformed("the stack is empty"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("the stack is empty"))
    }

    fn top(&self) -> PResult<&Val> {
        if self.stack.len() <= self.base() {
            return Err(self.malformed("the stack is empty"));
        }
        self.stack
            .last()
            .ok_or_else(|| self.malformed("the stack is empty"))
    }

    fn pop_mark(&mut self) -> PResult<Vec<Val>> {
        let base = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK to pop to"))?;
        Ok(self.stack.split_off(base))
    }

    fn new_obj(&mut self, obj: Obj) -> PResult<Val> {
        self.charge(OBJ_BYTES)?;
        self.objs.push(obj);
        Ok(Val::Obj(self.objs.len() - 1))
    }

    fn obj(&self, v: &Val) -> Option<&Obj> {
        match v {
            Val::Obj(i) => self.objs.get(*i),
            _ => None,
        }
    }

    fn string(&mut self, len: u64) -> PResult<()> {
        if len > self.limits.max_string_bytes as u64 {
            return Err(self.limit("bytes in a string", self.limits.max_string_bytes as u64));
        }
        let bytes = self.take(len as usize)?;
        let s = std::str::from_utf8(bytes).map_err(|_| self.malformed("a string is not UTF-8"))?;
        self.charge(len)?;
        self.push(Val::Str(Rc::from(s)))
    }

    fn line(&mut self) -> PResult<&'a str> {
        const MAX: usize = 256;
        let rest = &self.data[self.pos..];
        let window = &rest[..rest.len().min(MAX)];
        let Some(n) = window.iter().position(|&b| b == b'\n') else {
            return Err(if rest.len() < MAX {
                Problem::Truncated {
                    pos: self.data.len(),
                }
            } else {
                self.malformed("a GLOBAL name is longer than 256 bytes")
            });
        };
        let bytes = self.take(n + 1)?;
        let s = &bytes[..n];
        if !s.iter().all(|b| b.is_ascii_graphic()) {
            return Err(self.malformed(format!(
                "a GLOBAL name is not printable ASCII ('{}')",
                esc(&String::from_utf8_lossy(s))
            )));
        }
        std::str::from_utf8(s).map_err(|_| self.malformed("a GLOBAL name is not ASCII"))
    }

    fn global(&mut self, module: &str, name: &str) -> PResult<()> {
        match resolve_global(module, name) {
            Some(g) => self.push(Val::Global(g)),
            None => Err(Problem::Global {
                name: esc(&format!("{module}.{name}")),
                pos: self.op_pos,
            }),
        }
    }

    fn memo_put(&mut self, idx: u32) -> PResult<()> {
        let v = self.top()?.clone();
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&idx) {
            return Err(self.limit("memo entries", self.limits.max_memo as u64));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> PResult<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.malformed(format!("memo entry {idx} was never set")))?;
        self.push(v)
    }

    fn tuple(&mut self, items: Vec<Val>) -> PResult<()> {
        self.charge(items.len() as u64 * VAL_BYTES)?;
        let v = self.new_obj(Obj::Tuple(items))?;
        self.push(v)
    }

    /// The object id on top of the stack (not popped).
    fn top_obj(&self) -> PResult<usize> {
        match self.top()? {
            Val::Obj(i) => Ok(*i),
            other => Err(self.malformed(format!("expected a container, found {}", other.kind()))),
        }
    }

    fn set_items(&mut self, pairs: Vec<Val>) -> PResult<()> {
        if !pairs.len().is_multiple_of(2) {
            return Err(self.malformed("SETITEMS with an odd number of values"));
        }
        let id = self.top_obj()?;
        self.charge(pairs.len() as u64 * VAL_BYTES * 2)?;
        let mut it = pairs.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let key = match &k {
                Val::None => Key::None,
                Val::Bool(b) => Key::Bool(*b),
                Val::Int(i) => Key::Int(*i),
                Val::Str(s) => Key::Str(s.clone()),
                other => {
                    return Err(self.malformed(format!(
                        "a dict key is {}, not a string or a number",
                        other.kind()
                    )))
                }
            };
            let Some(Obj::Dict(d)) = self.objs.get_mut(id) else {
                let found = self.objs.get(id).map_or("nothing", Obj::kind);
                return Err(self.malformed(format!("SETITEM on {found}, not a dict")));
            };
            if !d.keys.insert(key.clone()) {
                return Err(Problem::DuplicateKey {
                    key: match key {
                        Key::Str(s) => esc(&s),
                        Key::Int(i) => i.to_string(),
                        Key::Bool(b) => b.to_string(),
                        Key::None => "None".into(),
                    },
                });
            }
            d.items.push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Val>) -> PResult<()> {
        let id = self.top_obj()?;
        self.charge(items.len() as u64 * VAL_BYTES)?;
        match self.objs.get_mut(id) {
            Some(Obj::List(l)) => {
                l.extend(items);
                Ok(())
            }
            other => {
                let found = other.map_or("nothing", |o| o.kind());
                Err(self.malformed(format!("APPEND to {found}, not a list")))
            }
        }
    }

    /// The items of a tuple argument with at most `max` items (checked before copying).
    fn tuple_items(&self, v: &Val, max: usize, what: &str) -> PResult<Vec<Val>> {
        match self.obj(v) {
            Some(Obj::Tuple(items)) if items.len() <= max => Ok(items.clone()),
            Some(Obj::Tuple(items)) => Err(self.malformed(format!(
                "{what} has {} items, at most {max} expected",
                items.len()
            ))),
            _ => Err(self.malformed(format!("{what} is {}, not a tuple", self.describe(v)))),
        }
    }

    fn describe(&self, v: &Val) -> &'static str {
        self.obj(v).map_or(v.kind(), Obj::kind)
    }

    fn is_empty_dict_or_none(&self, v: &Val) -> bool {
        match v {
            Val::None => true,
            _ => matches!(self.obj(v), Some(Obj::Dict(d)) if d.items.is_empty()),
        }
    }

    fn int_tuple(&self, v: &Val, what: &str) -> PResult<Vec<usize>> {
        let items = self.tuple_items(v, self.limits.max_rank, what)?;
        items
            .iter()
            .map(|x| match x {
                Val::Int(i) if *i >= 0 => usize::try_from(*i)
                    .map_err(|_| self.malformed(format!("{what} holds {i}, too large"))),
                other => Err(self.malformed(format!(
                    "{what} holds {}, not a non-negative int",
                    other.kind()
                ))),
            })
            .collect()
    }

    fn persistent_load(&mut self) -> PResult<()> {
        let pid = self.pop()?;
        let items = self.tuple_items(&pid, 5, "a persistent id")?;
        let [Val::Str(tag), Val::Global(Global::Storage(dtype)), Val::Str(key), Val::Str(_location), Val::Int(numel)] =
            items.as_slice()
        else {
            return Err(self.malformed(
                "a persistent id is not ('storage', torch.<Type>Storage, key, location, size)",
            ));
        };
        if &**tag != "storage" {
            return Err(self.malformed(format!(
                "a persistent id of kind '{}', not 'storage'",
                esc(tag)
            )));
        }
        let plain = !key.is_empty()
            && key.len() <= 64
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !plain {
            return Err(Problem::StorageKey { key: esc(key) });
        }
        let numel = u64::try_from(*numel).map_err(|_| {
            self.malformed(format!("the storage '{}' has a negative size", esc(key)))
        })?;
        if dtype.byte_len(numel).is_none() {
            return Err(self.malformed(format!(
                "the storage '{}' declares {numel} elements, more than 2^64 bytes",
                esc(key)
            )));
        }
        let decl = StorageDecl {
            dtype: *dtype,
            numel,
        };
        match self.storages.get(key) {
            Some(d) if d.dtype != decl.dtype || d.numel != decl.numel => {
                return Err(Problem::StorageConflict { key: esc(key) })
            }
            Some(_) => {}
            None => {
                self.charge(key.len() as u64 + 64)?;
                self.storages.insert(key.clone(), decl);
            }
        }
        let v = self.new_obj(Obj::Storage(key.clone()))?;
        self.push(v)
    }

    fn reduce(&mut self) -> PResult<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Val::Global(g) = callable else {
            return Err(self.malformed(format!(
                "REDUCE calls {}, not a known function",
                self.describe(&callable)
            )));
        };
        match g {
            Global::OrderedDict => {
                let items = self.tuple_items(&args, 0, "the arguments of OrderedDict")?;
                debug_assert!(items.is_empty());
                let v = self.new_obj(Obj::Dict(Dict::default()))?;
                self.push(v)
            }
            Global::RebuildTensor => {
                let a = self.tuple_items(&args, 7, "the arguments of _rebuild_tensor_v2")?;
                if a.len() < 6 {
                    return Err(self.malformed("_rebuild_tensor_v2 with fewer than 6 arguments"));
                }
                let storage = match self.obj(&a[0]) {
                    Some(Obj::Storage(k)) => k.clone(),
                    _ => {
                        return Err(self.malformed(format!(
                            "_rebuild_tensor_v2 of {}, not a storage",
                            self.describe(&a[0])
                        )))
                    }
                };
                let offset = match a[1] {
                    Val::Int(o) if o >= 0 => o as u64,
                    _ => return Err(self.malformed("a tensor's storage offset is not an int ≥ 0")),
                };
                let shape = self.int_tuple(&a[2], "a tensor's size")?;
                let strides = self.int_tuple(&a[3], "a tensor's stride")?;
                if shape.len() != strides.len() {
                    return Err(self.malformed("a tensor's size and stride differ in length"));
                }
                if !matches!(a[4], Val::Bool(_)) {
                    return Err(self.malformed("requires_grad is not a bool"));
                }
                if !self.is_empty_dict_or_none(&a[5]) {
                    return Err(self.malformed("a tensor has backward hooks"));
                }
                if a.len() == 7 && !self.is_empty_dict_or_none(&a[6]) {
                    return Err(self.malformed("a tensor has metadata (conjugate/negative bits)"));
                }
                if self.rebuilt.len() >= self.limits.max_tensors {
                    return Err(self.limit("tensors", self.limits.max_tensors as u64));
                }
                self.charge(((shape.len() * 2) as u64 + 8) * 8)?;
                self.rebuilt.push(Rebuilt {
                    storage,
                    offset,
                    shape,
                    strides,
                });
                let v = self.new_obj(Obj::Tensor(self.rebuilt.len() - 1))?;
                self.push(v)
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let n = if g == Global::RebuildParameter { 3 } else { 4 };
                let a = self.tuple_items(&args, n, "the arguments of _rebuild_parameter")?;
                if a.len() != n {
                    return Err(self.malformed(format!(
                        "_rebuild_parameter with {} arguments, {n} expected",
                        a.len()
                    )));
                }
                if !matches!(self.obj(&a[0]), Some(Obj::Tensor(_))) {
                    return Err(self.malformed("_rebuild_parameter of something not a tensor"));
                }
                if !matches!(a[1], Val::Bool(_)) || !self.is_empty_dict_or_none(&a[2]) {
                    return Err(self.malformed("a parameter with hooks or no requires_grad"));
                }
                if n == 4
                    && !matches!(a[3], Val::None)
                    && !matches!(self.obj(&a[3]), Some(Obj::Dict(_)))
                {
                    return Err(self.malformed("a parameter's state is not a dict"));
                }
                self.push(a[0].clone())
            }
            Global::Storage(_) => Err(self.malformed("REDUCE calls a storage type")),
        }
    }

    fn build(&mut self) -> PResult<()> {
        let state = self.pop()?;
        let target = self.top()?.clone();
        // An OrderedDict's attributes (transformers' `_metadata`): checked, then ignored.
        match (self.obj(&target), self.obj(&state)) {
            (Some(Obj::Dict(_)), Some(Obj::Dict(_))) => Ok(()),
            _ => Err(self.malformed(format!(
                "BUILD of {} with {}; only a dict's attributes are accepted",
                self.describe(&target),
                self.describe(&state)
            ))),
        }
    }

    fn run(&mut self) -> PResult<Val> {
        loop {
            self.op_pos = self.pos;
            let [op] = self.array::<1>()?;
            match op {
                0x80 => {
                    let [v] = self.array::<1>()?;
                    if v > 5 {
                        return Err(self.malformed(format!("pickle protocol {v}")));
                    }
                }
                b'}' => {
                    let v = self.new_obj(Obj::Dict(Dict::default()))?;
                    self.push(v)?;
                }
                b']' => {
                    let v = self.new_obj(Obj::List(Vec::new()))?;
                    self.push(v)?;
                }
                b')' => self.tuple(Vec::new())?,
                b'(' => {
                    if self.marks.len() >= self.limits.max_marks {
                        return Err(self.limit("nested MARKs", self.limits.max_marks as u64));
                    }
                    self.marks.push(self.stack.len());
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.base() + n {
                        return Err(self.malformed("the stack is empty"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.tuple(items)?;
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.array()?);
                    self.string(n as u64)?;
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.array()?);
                    self.string(n)?;
                }
                0x8c => {
                    let [n] = self.array::<1>()?;
                    self.string(n as u64)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Val::Int(v as i64))?;
                }
                b'K' => {
                    let [v] = self.array::<1>()?;
                    self.push(Val::Int(v as i64))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Val::Int(v as i64))?;
                }
                0x8a => {
                    let [n] = self.array::<1>()?;
                    if n > 8 {
                        return Err(self.malformed(format!("a {n}-byte integer (at most 8)")));
                    }
                    let bytes = self.take(n as usize)?;
                    let mut buf = [0u8; 8];
                    buf[..bytes.len()].copy_from_slice(bytes);
                    if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        for b in &mut buf[bytes.len()..] {
                            *b = 0xff;
                        }
                    }
                    self.push(Val::Int(i64::from_le_bytes(buf)))?;
                }
                0x88 => self.push(Val::Bool(true))?,
                0x89 => self.push(Val::Bool(false))?,
                b'N' => self.push(Val::None)?,
                b'G' => {
                    self.take(8)?;
                    self.push(Val::Float)?;
                }
                b'q' => {
                    let [i] = self.array::<1>()?;
                    self.memo_put(i as u32)?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.array()?);
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.limit("memo entries", u32::MAX as u64))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let [i] = self.array::<1>()?;
                    self.memo_get(i as u32)?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.array()?);
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Val::Str(m), Val::Str(n)) = (&module, &name) else {
                        return Err(self.malformed("STACK_GLOBAL of values that are not strings"));
                    };
                    self.global(m, n)?;
                }
                b'Q' => self.persistent_load()?,
                b'R' => self.reduce()?,
                b'b' => self.build()?,
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'.' => {
                    if !self.marks.is_empty() || self.stack.len() != 1 {
                        return Err(self.malformed(format!(
                            "STOP with {} values on the stack and {} open MARKs",
                            self.stack.len(),
                            self.marks.len()
                        )));
                    }
                    return self.pop();
                }
                op => {
                    return Err(Problem::Opcode {
                        op,
                        pos: self.op_pos,
                    })
                }
            }
        }
    }

    /// Turn the result into the state dict's tensors, checking each against its storage.
    fn finish(self, result: Val) -> PResult<StateDict> {
        let Some(Obj::Dict(dict)) = self.obj(&result) else {
            return Err(Problem::NotADict);
        };
        if dict.items.len() > self.limits.max_tensors {
            return Err(Problem::Limit {
                what: "tensors",
                limit: self.limits.max_tensors as u64,
                pos: None,
            });
        }
        let mut out = StateDict::default();
        let mut storage_bytes: u64 = 0;
        for (k, d) in &self.storages {
            storage_bytes =
                storage_bytes.saturating_add(d.dtype.byte_len(d.numel).unwrap_or(u64::MAX));
            out.storages.insert(k.to_string(), (d.dtype, d.numel));
        }
        let mut tensor_bytes: u64 = 0;
        for (k, v) in &dict.items {
            let Val::Str(name) = k else {
                return Err(Problem::NotATensor {
                    key: format!("<{}>", k.kind()),
                });
            };
            let Some(Obj::Tensor(i)) = self.obj(v) else {
                return Err(Problem::NotATensor { key: esc(name) });
            };
            let Some((r, decl)) = self
                .rebuilt
                .get(*i)
                .and_then(|r| Some((r, *self.storages.get(&r.storage)?)))
            else {
                return Err(Problem::NotATensor { key: esc(name) });
            };
            let bad = |what: String| Problem::TensorOutOfStorage {
                name: esc(name),
                what,
            };
            let numel = r
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| bad(format!("declares a size {:?} that overflows", r.shape)))?;
            if numel > 0 {
                let mut last = r.offset;
                for (&d, &s) in r.shape.iter().zip(&r.strides) {
                    last = (d as u64 - 1)
                        .checked_mul(s as u64)
                        .and_then(|x| last.checked_add(x))
                        .ok_or_else(|| bad("declares strides that overflow".into()))?;
                }
                if last >= decl.numel {
                    return Err(bad(format!(
                        "reaches element {last} of storage '{}', which holds {} elements",
                        esc(&r.storage),
                        decl.numel
                    )));
                }
            }
            if numel > decl.numel {
                return Err(bad(format!(
                    "has {numel} elements, more than its storage '{}' holds ({})",
                    esc(&r.storage),
                    decl.numel
                )));
            }
            let bytes = decl
                .dtype
                .byte_len(numel)
                .ok_or_else(|| bad("is too large".into()))?;
            tensor_bytes = tensor_bytes.saturating_add(bytes);
            let budget = storage_bytes
                .max(1)
                .saturating_mul(self.limits.max_expansion);
            if tensor_bytes > budget {
                return Err(Problem::Expansion {
                    limit: self.limits.max_expansion,
                });
            }
            out.tensors.push(TorchTensor {
                name: name.to_string(),
                dtype: decl.dtype,
                shape: r.shape.clone(),
                strides: r.strides.clone(),
                storage: r.storage.to_string(),
                offset: r.offset,
            });
        }
        Ok(out)
    }
}

/// Interpret `data` as the data.pkl of a state dict.
fn parse_state_dict(data: &[u8], limits: &Limits) -> PResult<StateDict> {
    let mut m = Machine::new(data, limits);
    let result = m.run()?;
    m.finish(result)
}

// ---------------------------------------------------------------------------------------------
// The zip archive.

/// A checkpoint opened and checked; tensors are read on demand.
pub struct TorchZip<R> {
    path: PathBuf,
    reader: R,
    tensors: Vec<TorchTensor>,
    storages: BTreeMap<String, StorageSpan>,
}

impl<R> fmt::Debug for TorchZip<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TorchZip")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Accept `<prefix>/<rest>` with plain components; return the prefix.
fn entry_prefix(name: &str) -> Option<&str> {
    if name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.chars().any(char::is_control)
    {
        return None;
    }
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() < 2 {
        return None;
    }
    // A directory entry ends with '/', giving one empty last component.
    let last = parts.len() - 1;
    for (i, p) in parts.iter().enumerate() {
        let empty_dir_tail = i == last && p.is_empty() && last >= 1;
        if (p.is_empty() && !empty_dir_tail) || *p == "." || *p == ".." {
            return None;
        }
    }
    Some(parts[0])
}

impl TorchZip<File> {
    /// Open and check a checkpoint file with `limits`.
    pub fn open(path: &Path, limits: &Limits) -> Result<Self, PickleError> {
        let io = |source| PickleError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        TorchZip::from_reader(file, path, limits)
    }
}

impl<R: Read + Seek> TorchZip<R> {
    /// Open and check a checkpoint from any reader; `path` names it in errors.
    pub fn from_reader(
        mut reader: R,
        path: impl Into<PathBuf>,
        limits: &Limits,
    ) -> Result<Self, PickleError> {
        let path = path.into();
        let io = |source| PickleError::Io {
            path: path.clone(),
            source,
        };
        let invalid = |problem| PickleError::Invalid {
            path: path.clone(),
            problem,
        };
        let file_len = reader.seek(SeekFrom::End(0)).map_err(io)?;
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut magic = [0u8; 4];
        let got = read_up_to(&mut reader, &mut magic).map_err(io)?;
        if got < 4 || magic != *b"PK\x03\x04" {
            return Err(invalid(Problem::NotZip {
                legacy: got >= 2 && magic[0] == 0x80,
            }));
        }
        reader.seek(SeekFrom::Start(0)).map_err(io)?;

        let mut archive = zip::ZipArchive::new(&mut reader).map_err(|source| PickleError::Zip {
            path: path.clone(),
            source,
        })?;
        if archive.len() > limits.max_entries {
            return Err(invalid(Problem::Limit {
                what: "zip entries",
                limit: limits.max_entries as u64,
                pos: None,
            }));
        }
        if archive.has_duplicate_names() {
            return Err(invalid(Problem::DuplicateEntry));
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut prefix: Option<String> = None;
        for i in 0..archive.len() {
            let raw = archive
                .name_for_index(i)
                .and_then(Result::ok)
                .map(|n| n.into_owned());
            let Some(name) = raw else {
                return Err(invalid(Problem::EntryName {
                    name: format!("#{i}"),
                }));
            };
            let Some(p) = entry_prefix(&name) else {
                return Err(invalid(Problem::EntryName { name: esc(&name) }));
            };
            match &prefix {
                None => prefix = Some(p.to_string()),
                Some(q) if q != p => return Err(invalid(Problem::EntryName { name: esc(&name) })),
                Some(_) => {}
            }
            names.insert(name, i);
        }
        let prefix = prefix.ok_or_else(|| invalid(Problem::NoPickle))?;

        // Entries read whole (data.pkl, byteorder) go through the zip reader, which checks
        // their CRC; `limit` bounds what is read.
        let read_small = |archive: &mut zip::ZipArchive<&mut R>,
                          entry: &str,
                          limit: u64,
                          what: &'static str|
         -> Result<Option<Vec<u8>>, PickleError> {
            let Some(&i) = names.get(entry) else {
                return Ok(None);
            };
            let f = archive.by_index(i).map_err(|source| PickleError::Zip {
                path: path.clone(),
                source,
            })?;
            if f.size() > limit {
                return Err(invalid(Problem::Limit {
                    what,
                    limit,
                    pos: None,
                }));
            }
            let mut buf = Vec::with_capacity(f.size() as usize);
            f.take(limit + 1)
                .read_to_end(&mut buf)
                .map_err(|source| PickleError::Io {
                    path: path.clone(),
                    source,
                })?;
            if buf.len() as u64 > limit {
                return Err(invalid(Problem::Limit {
                    what,
                    limit,
                    pos: None,
                }));
            }
            Ok(Some(buf))
        };
        if let Some(order) = read_small(
            &mut archive,
            &format!("{prefix}/byteorder"),
            64,
            "bytes in byteorder",
        )? {
            let text = String::from_utf8_lossy(&order);
            if text.trim() != "little" {
                return Err(invalid(Problem::ByteOrder {
                    found: esc(text.trim()),
                }));
            }
        }
        let pkl = read_small(
            &mut archive,
            &format!("{prefix}/data.pkl"),
            limits.max_pickle_bytes,
            "bytes in data.pkl",
        )?
        .ok_or_else(|| invalid(Problem::NoPickle))?;
        let state = parse_state_dict(&pkl, limits).map_err(invalid)?;

        let mut storages = BTreeMap::new();
        for (key, (dtype, numel)) in &state.storages {
            let entry = format!("{prefix}/data/{key}");
            let Some(&i) = names.get(&entry) else {
                return Err(invalid(Problem::MissingStorage { key: key.clone() }));
            };
            let f = archive.by_index_raw(i).map_err(|source| PickleError::Zip {
                path: path.clone(),
                source,
            })?;
            if f.compression() != zip::CompressionMethod::Stored
                || f.encrypted()
                || f.compressed_size() != f.size()
            {
                return Err(invalid(Problem::NotStored { entry: esc(&entry) }));
            }
            let start = f
                .data_start()
                .ok_or_else(|| invalid(Problem::EntryOutsideFile { entry: esc(&entry) }))?;
            let size = f.size();
            if start.checked_add(size).is_none_or(|end| end > file_len) {
                return Err(invalid(Problem::EntryOutsideFile { entry: esc(&entry) }));
            }
            // Checked when data.pkl was parsed.
            let len = dtype.byte_len(*numel).unwrap_or(u64::MAX);
            if len > size {
                return Err(invalid(Problem::StorageTooSmall {
                    key: key.clone(),
                    declared: len,
                    actual: size,
                }));
            }
            storages.insert(
                key.clone(),
                StorageSpan {
                    file_offset: start,
                    len,
                    dtype: *dtype,
                    numel: *numel,
                },
            );
        }
        drop(archive);
        Ok(TorchZip {
            path,
            reader,
            tensors: state.tensors,
            storages,
        })
    }

    /// The checkpoint's path (as given).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state dict's tensors, in the file's order.
    pub fn tensors(&self) -> &[TorchTensor] {
        &self.tensors
    }

    /// Where a storage lies in the file.
    pub fn storage(&self, key: &str) -> Option<&StorageSpan> {
        self.storages.get(key)
    }

    fn span(&self, t: &TorchTensor) -> Result<StorageSpan, PickleError> {
        self.storages
            .get(&t.storage)
            .copied()
            .filter(|s| s.dtype == t.dtype)
            .ok_or_else(|| PickleError::Invalid {
                path: self.path.clone(),
                problem: Problem::MissingStorage {
                    key: esc(&t.storage),
                },
            })
    }

    fn read_at(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, PickleError> {
        let io = |source| PickleError::Io {
            path: self.path.clone(),
            source,
        };
        let n = usize::try_from(len).map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                "a storage larger than the address space",
            ))
        })?;
        self.reader.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut buf = vec![0u8; n];
        self.reader.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    /// The raw bytes of a whole storage.
    pub fn read_storage(&mut self, key: &str) -> Result<Vec<u8>, PickleError> {
        let s = self
            .storages
            .get(key)
            .copied()
            .ok_or_else(|| PickleError::Invalid {
                path: self.path.clone(),
                problem: Problem::MissingStorage { key: esc(key) },
            })?;
        self.read_at(s.file_offset, s.len)
    }

    /// The bytes of one tensor, row-major and little-endian (strided views gathered).
    pub fn read_tensor(&mut self, t: &TorchTensor) -> Result<Vec<u8>, PickleError> {
        let span = self.span(t)?;
        let es = t.dtype.size_in_bytes() as u64;
        let numel = t.numel();
        let bad = |what: &str| PickleError::Invalid {
            path: self.path.clone(),
            problem: Problem::TensorOutOfStorage {
                name: esc(&t.name),
                what: what.to_string(),
            },
        };
        if numel == 0 {
            return Ok(Vec::new());
        }
        // The last element's index (checked at open for tensors of this file; again here for
        // one built by hand).
        let mut last = t.offset;
        for (&d, &s) in t.shape.iter().zip(&t.strides) {
            last = (d as u64 - 1)
                .checked_mul(s as u64)
                .and_then(|x| last.checked_add(x))
                .ok_or_else(|| bad("declares strides that overflow"))?;
        }
        if t.shape.len() != t.strides.len() || last >= span.numel || numel > span.numel {
            return Err(bad("reaches outside its storage"));
        }
        if t.is_contiguous() {
            return self.read_at(span.file_offset + t.offset * es, numel * es);
        }
        let first = t.offset;
        let window = self.read_at(span.file_offset + first * es, (last - first + 1) * es)?;
        let es = es as usize;
        let rank = t.shape.len();
        let mut out = Vec::with_capacity(numel as usize * es);
        // Row-major walk with an explicit index counter; the innermost dimension is copied
        // element by element (or as one run when its stride is 1).
        let inner = rank - 1;
        let inner_len = t.shape[inner];
        let inner_stride = t.strides[inner];
        let mut idx = vec![0usize; rank];
        loop {
            let base: usize = idx
                .iter()
                .zip(&t.strides)
                .map(|(&i, &s)| i * s)
                .sum::<usize>();
            if inner_stride == 1 {
                out.extend_from_slice(&window[base * es..(base + inner_len) * es]);
            } else {
                for j in 0..inner_len {
                    let e = base + j * inner_stride;
                    out.extend_from_slice(&window[e * es..(e + 1) * es]);
                }
            }
            // Advance the outer dimensions.
            let mut d = inner;
            loop {
                if d == 0 {
                    return Ok(out);
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Fuzz body (the cargo-fuzz target `torch_pickle` calls it; the unit tests run it over a
/// hostile corpus): `data` both as a whole checkpoint file and as a bare data.pkl. Must return
/// (an error is fine) and never panic or allocate without bound. When a file opens, every
/// tensor reads back with exactly its declared byte count.
pub fn fuzz_torch_checkpoint(data: &[u8]) {
    let limits = Limits::default();
    let _ = parse_state_dict(data, &limits);
    if let Ok(mut z) = TorchZip::from_reader(std::io::Cursor::new(data), "fuzz.bin", &limits) {
        for t in z.tensors().to_vec() {
            if let Ok(bytes) = z.read_tensor(&t) {
                assert_eq!(bytes.len() as u64, t.byte_len(), "{}", t.name);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    /// A pickle written opcode by opcode, as torch's writer does.
    #[derive(Default)]
    pub(crate) struct P(pub(crate) Vec<u8>);

    impl P {
        pub(crate) fn new() -> Self {
            P(vec![0x80, 2])
        }
        pub(crate) fn op(&mut self, b: u8) -> &mut Self {
            self.0.push(b);
            self
        }
        pub(crate) fn raw(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
        pub(crate) fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(b'c')
                .raw(module.as_bytes())
                .op(b'\n')
                .raw(name.as_bytes())
                .op(b'\n')
        }
        pub(crate) fn str(&mut self, s: &str) -> &mut Self {
            self.op(b'X')
                .raw(&(s.len() as u32).to_le_bytes())
                .raw(s.as_bytes())
        }
        fn int(&mut self, v: i64) -> &mut Self {
            self.op(0x8a).op(8).raw(&v.to_le_bytes())
        }
        fn ints(&mut self, v: &[i64]) -> &mut Self {
            self.op(b'(');
            for &x in v {
                self.int(x);
            }
            self.op(b't')
        }
        fn ordered_dict(&mut self) -> &mut Self {
            self.global("collections", "OrderedDict").op(b')').op(b'R')
        }
        /// `_rebuild_tensor_v2(storage, offset, shape, strides, False, OrderedDict())`.
        fn tensor(&mut self, t: &T) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b'(')
                .op(b'(')
                .str("storage")
                .global("torch", t.class)
                .str(t.key)
                .str("cpu")
                .int(t.numel)
                .op(b't')
                .op(b'Q')
                .int(t.offset)
                .ints(&t.shape)
                .ints(&t.strides)
                .op(0x89)
                .ordered_dict()
                .op(b't')
                .op(b'R')
        }
    }

    /// One tensor of a test state dict.
    pub(crate) struct T {
        pub(crate) name: &'static str,
        pub(crate) class: &'static str,
        pub(crate) key: &'static str,
        pub(crate) numel: i64,
        pub(crate) offset: i64,
        pub(crate) shape: Vec<i64>,
        pub(crate) strides: Vec<i64>,
    }

    pub(crate) fn t(
        name: &'static str,
        key: &'static str,
        numel: i64,
        shape: &[i64],
        strides: &[i64],
    ) -> T {
        T {
            name,
            class: "FloatStorage",
            key,
            numel,
            offset: 0,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        }
    }

    pub(crate) fn state_dict(tensors: &[T]) -> Vec<u8> {
        let mut p = P::new();
        p.op(b'}').op(b'(');
        for x in tensors {
            p.str(x.name).tensor(x);
        }
        p.op(b'u').op(b'.');
        p.0
    }

    /// A zip of stored entries.
    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            w.start_file(*name, opts).expect("entry");
            w.write_all(data).expect("data");
        }
        w.finish().expect("zip").into_inner()
    }

    /// A checkpoint: `archive/data.pkl`, `archive/byteorder`, and storages.
    pub(crate) fn checkpoint(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut entries: Vec<(String, &[u8])> = vec![
            ("archive/data.pkl".into(), pkl),
            ("archive/byteorder".into(), b"little"),
        ];
        for (k, v) in storages {
            entries.push((format!("archive/data/{k}"), v));
        }
        entries.push(("archive/version".into(), b"3\n"));
        let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        zip_of(&refs)
    }

    pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn open(bytes: &[u8]) -> Result<TorchZip<Cursor<&[u8]>>, PickleError> {
        TorchZip::from_reader(Cursor::new(bytes), "adapter_model.bin", &Limits::default())
    }

    fn problem(bytes: &[u8]) -> Problem {
        match open(bytes) {
            Ok(_) => panic!("a hostile checkpoint opened"),
            Err(e) => e
                .problem()
                .cloned()
                .unwrap_or_else(|| panic!("not a problem: {e}")),
        }
    }

    pub(crate) fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    const FIXTURES: [&str; 3] = [
        "parity/mm_projector.bin",
        "train/moelora/adapter_model.bin",
        "train/moelora/non_lora_trainables.bin",
    ];

    #[test]
    fn the_real_torch_fixtures_read_completely() {
        let mut z = TorchZip::open(&fixture(FIXTURES[0]), &Limits::default()).expect("opens");
        let names: Vec<(&str, &[usize])> = z
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        assert_eq!(
            names,
            [
                ("model.mm_projector.0.weight", &[32usize, 32][..]),
                ("model.mm_projector.0.bias", &[32][..]),
                ("model.mm_projector.2.weight", &[32, 32][..]),
                ("model.mm_projector.2.bias", &[32][..]),
            ]
        );
        let w = z.tensors()[0].clone();
        assert_eq!(
            (w.dtype, w.strides.as_slice(), w.storage.as_str()),
            (Dtype::F32, &[32usize, 1][..], "0")
        );
        assert!(w.is_contiguous());
        assert_eq!(
            z.read_tensor(&w).expect("reads"),
            z.read_storage("0").expect("storage")
        );

        // CoIN's MoELoRA adapter: every expert weight under two names, sharing one tensor.
        let mut z = TorchZip::open(&fixture(FIXTURES[1]), &Limits::default()).expect("opens");
        // 2 layers × 7 modules × (4 experts × A/B × 2 spellings + a router).
        assert_eq!(z.tensors().len(), 14 * (4 * 2 * 2 + 1));
        let a = z.tensors()[0].clone();
        let twin = z.tensors()[1].clone();
        assert!(twin.name.ends_with("loraA.0.mlp.weight"), "{}", twin.name);
        assert_eq!(a.storage, twin.storage);
        assert_eq!(
            z.read_tensor(&a).expect("a"),
            z.read_tensor(&twin).expect("twin")
        );
        for t in z.tensors().to_vec() {
            assert_eq!(z.read_tensor(&t).expect("reads").len() as u64, t.byte_len());
        }
        let z = TorchZip::open(&fixture(FIXTURES[2]), &Limits::default()).expect("opens");
        assert_eq!(z.tensors().len(), 4);
    }

    #[test]
    fn strided_views_are_gathered_row_major() {
        let data = f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut slice = t("slice", "0", 6, &[2], &[3]);
        slice.offset = 1;
        let pkl = state_dict(&[
            t("plain", "0", 6, &[2, 3], &[3, 1]),
            t("transposed", "0", 6, &[3, 2], &[1, 3]),
            slice,
            t("empty", "0", 6, &[0, 4], &[4, 1]),
        ]);
        let file = checkpoint(&pkl, &[("0", data)]);
        let mut z = open(&file).expect("opens");
        let read = |z: &mut TorchZip<_>, i: usize| -> Vec<f32> {
            let t = z.tensors()[i].clone();
            z.read_tensor(&t)
                .expect("reads")
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        assert_eq!(read(&mut z, 0), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(!z.tensors()[1].is_contiguous());
        assert_eq!(read(&mut z, 1), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(read(&mut z, 2), [1.0, 4.0]);
        assert_eq!(read(&mut z, 3), Vec::<f32>::new());
    }

    #[test]
    fn transformers_ordered_dicts_with_metadata_and_parameters_are_read() {
        // OrderedDict() + SETITEMS + BUILD({'_metadata': OrderedDict([('', {'version': 1})])}),
        // a Parameter around a tensor, memo round trips and STACK_GLOBAL.
        let x = t("w", "0", 2, &[2], &[1]);
        let mut p = P::new();
        p.ordered_dict().op(b'q').op(0).op(b'(');
        p.str("w").tensor(&x).op(b'q').op(1);
        p.str("p")
            .str("torch._utils")
            .str("_rebuild_parameter")
            .op(0x93)
            .op(b'h')
            .op(1)
            .op(0x88)
            .ordered_dict()
            .op(0x87)
            .op(b'R');
        p.op(b'u');
        p.op(b'}')
            .str("_metadata")
            .ordered_dict()
            .str("")
            .op(b'}')
            .str("version");
        p.op(b'K')
            .op(1)
            .op(b's')
            .op(b's')
            .op(b's')
            .op(b'b')
            .op(b'.');
        let file = checkpoint(&p.0, &[("0", f32_bytes(&[1.0, 2.0]))]);
        let z = open(&file).expect("opens");
        let names: Vec<&str> = z.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w", "p"]);
    }

    #[test]
    fn deep_mark_nesting_is_refused_without_recursion() {
        // The attacker's file: 200,000 nested MARKs.
        let mut p = P::new();
        p.raw(&vec![b'('; 200_000]).op(b'.');
        let file = checkpoint(&p.0, &[]);
        assert_eq!(
            problem(&file),
            Problem::Limit {
                what: "nested MARKs",
                limit: 1024,
                pos: Some(2 + 1024)
            }
        );
        // Deep nesting of containers instead (TUPLE1 200,000 times): built in the arena, no
        // recursion when dropped, refused because it is not a state dict.
        let mut p = P::new();
        p.op(b')').raw(&vec![0x85; 200_000]).op(b'.');
        assert_eq!(problem(&checkpoint(&p.0, &[])), Problem::NotADict);
    }

    #[test]
    fn memo_and_allocation_blow_ups_are_bounded() {
        let small = Limits {
            max_memo: 100,
            max_alloc_bytes: 100_000,
            max_stack: 1000,
            ..Limits::default()
        };
        let parse = |p: &P| parse_state_dict(&p.0, &small).expect_err("refused");
        let mut p = P::new();
        p.op(b'N');
        for i in 0..200u32 {
            p.op(b'r').raw(&i.to_le_bytes());
        }
        assert!(matches!(
            parse(&p),
            Problem::Limit {
                what: "memo entries",
                ..
            }
        ));
        // A memo index far away costs one entry, not a table of 4 billion.
        let mut p = P::new();
        p.op(b'N')
            .op(b'r')
            .raw(&u32::MAX.to_le_bytes())
            .op(b'j')
            .raw(&u32::MAX.to_le_bytes())
            .op(b'.');
        assert!(
            matches!(parse(&p), Problem::Malformed { .. }),
            "two values left"
        );
        let mut p = P::new();
        p.op(b'h').op(7);
        assert!(matches!(parse(&p), Problem::Malformed { .. }));
        // Billion laughs: a list appended to itself through the memo, again and again.
        let mut p = P::new();
        p.op(b']').op(b'q').op(0);
        for _ in 0..100 {
            p.op(b'(').raw(&[b'h', 0].repeat(500)).op(b'e');
        }
        assert!(matches!(
            parse(&p),
            Problem::Limit {
                what: "bytes allocated",
                ..
            }
        ));
        // Values piled on the stack.
        let mut p = P::new();
        p.raw(&[b'N'; 2000]);
        assert!(matches!(
            parse(&p),
            Problem::Limit {
                what: "values on the stack",
                ..
            }
        ));
    }

    #[test]
    fn huge_declared_sizes_are_refused_before_allocating() {
        // A string of 2^64 - 1 bytes, and of 4 GiB.
        let mut p = P::new();
        p.op(0x8d).raw(&u64::MAX.to_le_bytes());
        assert!(matches!(
            problem(&checkpoint(&p.0, &[])),
            Problem::Limit {
                what: "bytes in a string",
                ..
            }
        ));
        let mut p = P::new();
        p.op(b'X').raw(&u32::MAX.to_le_bytes()).raw(b"abc");
        assert!(matches!(
            problem(&checkpoint(&p.0, &[])),
            Problem::Limit {
                what: "bytes in a string",
                ..
            }
        ));
        // A storage of 2^40 floats in a 4-byte entry.
        let pkl = state_dict(&[t("w", "0", 1 << 40, &[1], &[1])]);
        assert_eq!(
            problem(&checkpoint(&pkl, &[("0", vec![0; 4])])),
            Problem::StorageTooSmall {
                key: "0".into(),
                declared: 4 << 40,
                actual: 4
            }
        );
        // A storage of more than 2^64 bytes.
        let pkl = state_dict(&[t("w", "0", i64::MAX, &[1], &[1])]);
        assert!(matches!(
            problem(&checkpoint(&pkl, &[])),
            Problem::Malformed { .. }
        ));
        // A tensor whose element count overflows.
        let pkl = state_dict(&[t("w", "0", 4, &[1 << 40, 1 << 40], &[1, 1])]);
        assert!(matches!(
            problem(&checkpoint(&pkl, &[("0", vec![0; 16])])),
            Problem::TensorOutOfStorage { .. }
        ));
        // A data.pkl larger than the limit.
        let pkl = state_dict(&[t("w", "0", 1, &[1], &[1])]);
        let file = checkpoint(&pkl, &[("0", vec![0; 4])]);
        let tight = Limits {
            max_pickle_bytes: 16,
            ..Limits::default()
        };
        let e = TorchZip::from_reader(Cursor::new(&file[..]), "x.bin", &tight).expect_err("big");
        assert!(matches!(
            e.problem(),
            Some(Problem::Limit {
                what: "bytes in data.pkl",
                ..
            })
        ));
        // Too many tensors.
        let few = Limits {
            max_tensors: 1,
            ..Limits::default()
        };
        let pkl = state_dict(&[t("a", "0", 1, &[1], &[1]), t("b", "0", 1, &[1], &[1])]);
        let file = checkpoint(&pkl, &[("0", vec![0; 4])]);
        let e = TorchZip::from_reader(Cursor::new(&file[..]), "x.bin", &few).expect_err("many");
        assert!(matches!(
            e.problem(),
            Some(Problem::Limit {
                what: "tensors",
                ..
            })
        ));
    }

    #[test]
    fn tensors_and_storages_out_of_range_are_refused() {
        let bytes = f32_bytes(&[0.0; 6]);
        let bad = |tensors: &[T], storages: &[(&str, Vec<u8>)]| {
            problem(&checkpoint(&state_dict(tensors), storages))
        };
        // Past the end of the storage (offset + extent).
        let mut x = t("w", "0", 6, &[2, 3], &[3, 1]);
        x.offset = 1;
        let p = bad(&[x], &[("0", bytes.clone())]);
        assert!(
            p.to_string()
                .contains("the tensor 'w' reaches element 6 of storage '0', which holds 6"),
            "{p}"
        );
        // Strides reaching outside.
        let p = bad(&[t("w", "0", 6, &[2, 3], &[5, 1])], &[("0", bytes.clone())]);
        assert!(matches!(p, Problem::TensorOutOfStorage { .. }), "{p}");
        // An expanded view (stride 0): more elements than the storage, refused.
        let p = bad(
            &[t("w", "0", 1, &[1000], &[0])],
            &[("0", f32_bytes(&[1.0]))],
        );
        assert!(p.to_string().contains("more than its storage"), "{p}");
        // A storage declaring more than its entry holds, and one with no entry.
        let p = bad(&[t("w", "0", 7, &[6], &[1])], &[("0", bytes.clone())]);
        assert!(
            matches!(
                p,
                Problem::StorageTooSmall {
                    declared: 28,
                    actual: 24,
                    ..
                }
            ),
            "{p}"
        );
        let p = bad(&[t("w", "1", 6, &[6], &[1])], &[("0", bytes.clone())]);
        assert_eq!(p, Problem::MissingStorage { key: "1".into() });
        // One storage with two sizes; a storage key that is a path.
        let p = bad(
            &[t("a", "0", 6, &[6], &[1]), t("b", "0", 5, &[5], &[1])],
            &[("0", bytes.clone())],
        );
        assert_eq!(p, Problem::StorageConflict { key: "0".into() });
        let p = bad(&[t("w", "../0", 6, &[6], &[1])], &[("0", bytes.clone())]);
        assert_eq!(p, Problem::StorageKey { key: "../0".into() });
        // Many tensors on one storage: bounded by the expansion limit.
        let many: Vec<T> = (0..5).map(|_| t("w", "0", 6, &[6], &[1])).collect();
        let p = bad(&many, &[("0", bytes.clone())]);
        assert!(matches!(p, Problem::DuplicateKey { .. }), "{p}");
        let names = ["a", "b", "c", "d", "e"];
        let many: Vec<T> = names.iter().map(|n| t(n, "0", 6, &[6], &[1])).collect();
        let p = bad(&many, &[("0", bytes)]);
        assert_eq!(p, Problem::Expansion { limit: 4 });
    }

    #[test]
    fn forbidden_globals_are_refused_not_resolved() {
        for (module, name) in [
            ("os", "system"),
            ("posix", "system"),
            ("builtins", "eval"),
            ("__builtin__", "exec"),
            ("subprocess", "Popen"),
            ("torch", "load"),
            ("torch._utils", "_rebuild_qtensor"),
            ("collections", "defaultdict"),
        ] {
            let mut p = P::new();
            p.global(module, name)
                .str("echo pwned")
                .op(0x85)
                .op(b'R')
                .op(b'.');
            let got = problem(&checkpoint(&p.0, &[]));
            assert_eq!(
                got,
                Problem::Global {
                    name: format!("{module}.{name}"),
                    pos: 2
                }
            );
            assert!(
                got.to_string().contains("was not imported or called"),
                "{got}"
            );
            // The same through STACK_GLOBAL.
            let mut p = P::new();
            p.str(module).str(name).op(0x93).op(b'.');
            let got = problem(&checkpoint(&p.0, &[]));
            assert!(matches!(got, Problem::Global { .. }), "{got}");
        }
        // A name with a control character is escaped in the message.
        let mut p = P::new();
        p.str("os\u{1b}[2J").str("system").op(0x93);
        let e = open(&checkpoint(&p.0, &[])).expect_err("refused");
        assert!(e.to_string().contains("os\\u{1b}[2J.system"), "{e}");
    }

    #[test]
    fn opcodes_outside_the_state_dict_subset_are_named() {
        for (op, name) in [
            (b'i', "INST"),
            (0x81, "NEWOBJ"),
            (b'B', "BINBYTES"),
            (0x95, "FRAME"),
            (b'0', "POP"),
            (0xff, "an unknown opcode"),
        ] {
            let mut p = P::new();
            p.op(op);
            let got = problem(&checkpoint(&p.0, &[]));
            assert_eq!(got, Problem::Opcode { op, pos: 2 });
            assert!(got.to_string().contains(name), "{got}");
        }
        // Structural nonsense in allowed opcodes.
        for bytes in [
            &[b'.'][..],             // STOP on an empty stack
            &[b'N', b'N', b'.'][..], // two results
            &[b'(', b'N', b'.'][..], // an open MARK
            &[b'N', b'N', b'R'][..], // REDUCE of None
            &[b'u'][..],             // SETITEMS without MARK
            &[b'N', b'N', b'N', b's'][..],
            &[0x80, 9][..],
        ] {
            let mut p = P::new();
            p.raw(bytes);
            let got = problem(&checkpoint(&p.0, &[]));
            assert!(matches!(got, Problem::Malformed { .. }), "{bytes:?}: {got}");
        }
        let mut p = P::new();
        p.op(b'N');
        assert_eq!(
            problem(&checkpoint(&p.0, &[])),
            Problem::Truncated { pos: 3 }
        );
        // Values that are not tensors; keys that appear twice.
        let mut p = P::new();
        p.op(b'}').str("x").op(b'N').op(b's').op(b'.');
        assert_eq!(
            problem(&checkpoint(&p.0, &[])),
            Problem::NotATensor { key: "x".into() }
        );
    }

    #[test]
    fn truncated_and_damaged_zips_are_refused() {
        let whole = std::fs::read(fixture(FIXTURES[0])).expect("fixture");
        assert!(open(&whole).is_ok());
        for n in 0..whole.len() {
            assert!(open(&whole[..n]).is_err(), "a {n}-byte prefix opened");
        }
        assert_eq!(
            problem(&[0x80, 2, 0x8a, 0x0a]),
            Problem::NotZip { legacy: true }
        );
        assert_eq!(
            problem(b"{\"not\": \"zip\"}"),
            Problem::NotZip { legacy: false }
        );
        assert!(matches!(
            open(b"PK\x03\x04 and nothing"),
            Err(PickleError::Zip { .. })
        ));
        // A storage entry stored compressed.
        let pkl = state_dict(&[t("w", "0", 1, &[1], &[1])]);
        let mut file = checkpoint(&pkl, &[("0", vec![0; 4])]);
        set_method(&mut file, "archive/data/0", 8);
        assert!(matches!(problem(&file), Problem::NotStored { .. }));
        // Big-endian storages.
        let file = zip_of(&[
            ("a/data.pkl", &pkl),
            ("a/byteorder", b"big"),
            ("a/data/0", &[0; 4]),
        ]);
        assert_eq!(
            problem(&file),
            Problem::ByteOrder {
                found: "big".into()
            }
        );
    }

    /// Set the compression method of one entry in its local and central headers.
    fn set_method(file: &mut [u8], entry: &str, method: u16) {
        for (sig, method_at, name_len_at, name_at) in
            [(b"PK\x03\x04", 8, 26, 30), (b"PK\x01\x02", 10, 28, 46)]
        {
            let mut i = 0;
            while i + name_at < file.len() {
                if &file[i..i + 4] == sig {
                    let n = u16::from_le_bytes([file[i + name_len_at], file[i + name_len_at + 1]])
                        as usize;
                    if file.get(i + name_at..i + name_at + n) == Some(entry.as_bytes()) {
                        file[i + method_at..i + method_at + 2]
                            .copy_from_slice(&method.to_le_bytes());
                    }
                }
                i += 1;
            }
        }
    }

    #[test]
    fn entry_names_that_leave_the_folder_are_refused() {
        let pkl = state_dict(&[t("w", "0", 1, &[1], &[1])]);
        for evil in [
            "../outside",
            "archive/../../etc/passwd",
            "/etc/passwd",
            "archive/./data/0",
            "archive//x",
            "archive\\..\\x",
            "other/data/1",
            "archive/x\u{7}y",
            "toplevel",
        ] {
            let file = zip_of(&[
                ("archive/data.pkl", &pkl),
                (evil, b"x"),
                ("archive/data/0", &[0; 4]),
            ]);
            let got = problem(&file);
            assert!(matches!(got, Problem::EntryName { .. }), "{evil}: {got}");
        }
        // Directory entries are fine.
        let file = zip_of(&[
            ("archive/data.pkl", &pkl),
            ("archive/data/", b""),
            ("archive/data/0", &[0; 4]),
        ]);
        assert!(open(&file).is_ok());
    }

    /// The hostile inputs of the tests above, plus seeded mutations of real files: the fuzz
    /// body must return on each.
    #[test]
    fn the_fuzz_body_survives_a_hostile_corpus() {
        let mut corpus: Vec<Vec<u8>> = FIXTURES
            .iter()
            .map(|f| std::fs::read(fixture(f)).expect("fixture"))
            .collect();
        let mut deep = P::new();
        deep.raw(&vec![b'('; 20_000]);
        corpus.push(deep.0.clone());
        corpus.push(checkpoint(&deep.0, &[]));
        let mut laughs = P::new();
        laughs.op(b']').op(b'q').op(0);
        for _ in 0..10 {
            laughs.op(b'(').raw(&[b'h', 0].repeat(200)).op(b'e');
        }
        corpus.push(laughs.0.clone());
        let mut view = t("v", "0", 6, &[3, 2], &[1, 3]);
        view.offset = 0;
        corpus.push(checkpoint(
            &state_dict(&[view]),
            &[("0", f32_bytes(&[1.0; 6]))],
        ));
        // Seeded mutations (SplitMix64): flip, overwrite with boundary values, truncate.
        let mut state = 0x5eed_u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let seeds = corpus.clone();
        for _ in 0..3000 {
            let mut m = seeds[(next() % seeds.len() as u64) as usize].clone();
            if m.is_empty() {
                continue;
            }
            for _ in 0..1 + next() % 4 {
                let i = (next() % m.len() as u64) as usize;
                m[i] = match next() % 4 {
                    0 => m[i] ^ (1 << (next() % 8)),
                    1 => 0xff,
                    2 => 0,
                    _ => next() as u8,
                };
            }
            if next() % 8 == 0 {
                let n = (next() % m.len() as u64) as usize;
                m.truncate(n);
            }
            corpus.push(m);
        }
        for input in &corpus {
            fuzz_torch_checkpoint(input);
        }
    }
}
