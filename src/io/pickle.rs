//! A restricted pickle machine for PyTorch checkpoints.
//!
//! It interprets the opcodes of pickle protocols 0-5 that `torch.save` emits and
//! understands a fixed allowlist of globals (tensor / parameter rebuild functions,
//! storage types, `collections.OrderedDict`, `collections.defaultdict`,
//! `builtins.dict`, inert placeholders for optimizer classes). Any other global
//! is refused with an error naming it; nothing it reads is ever called or
//! executed: "calling" an allowed global only builds a plain value here.
//!
//! Bounds, so that a small hostile file fails fast: every length is checked
//! against the bytes that remain; containers nest at most `MAX_DEPTH` deep (a
//! container is frozen once placed in another, so recorded depths stay exact and
//! dropping a value never recurses deeper); the memo is a map (a huge index costs
//! nothing); repeated memo references share one value instead of copying it;
//! the MARK stack and the number of values are bounded too.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Deepest container nesting accepted.
pub const MAX_DEPTH: usize = 200;
/// Most values alive on the stack, the mark stack and in containers together.
const MAX_VALUES: usize = 50_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PickleError {
    #[error(
        "refused global `{0}`: not on the allowlist of a tensor checkpoint (nothing was executed)"
    )]
    RefusedGlobal(String),
    #[error("truncated pickle: {0}")]
    Truncated(&'static str),
    #[error("unsupported pickle opcode 0x{0:02x} at byte {1}")]
    Opcode(u8, usize),
    #[error("malformed pickle at byte {pos}: {msg}")]
    Malformed { pos: usize, msg: String },
    #[error("pickle exceeds a limit: {0}")]
    Limit(String),
}

type R<T> = std::result::Result<T, PickleError>;

/// The globals a checkpoint may name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Global {
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    /// `torch.<X>Storage` with its element type name.
    StorageType(&'static str),
    OrderedDict,
    DefaultDict,
    Dict,
    /// An object kept only as its class name (optimizers): its state is parsed
    /// and dropped.
    Placeholder(String),
}

fn allowed(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "FloatStorage") => Global::StorageType("f32"),
        ("torch", "HalfStorage") => Global::StorageType("f16"),
        ("torch", "BFloat16Storage") => Global::StorageType("bf16"),
        ("torch", "DoubleStorage") => Global::StorageType("f64"),
        ("torch", "LongStorage") => Global::StorageType("i64"),
        ("torch", "IntStorage") => Global::StorageType("i32"),
        ("torch", "ShortStorage") => Global::StorageType("i16"),
        ("torch", "CharStorage") => Global::StorageType("i8"),
        ("torch", "ByteStorage") => Global::StorageType("u8"),
        ("torch", "BoolStorage") => Global::StorageType("bool"),
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("collections", "defaultdict") => Global::DefaultDict,
        ("builtins" | "__builtin__", "dict") => Global::Dict,
        ("torch.optim.adam", "Adam")
        | ("torch.optim.adamw", "AdamW")
        | ("torch.optim.sgd", "SGD") => Global::Placeholder(format!("{module}.{name}")),
        _ => return None,
    })
}

/// A container's items and the depth of the deepest nesting below it.
#[derive(Debug)]
pub struct Node<T> {
    pub items: T,
    depth: usize,
    frozen: bool,
}

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, kept as its little-endian two's complement bytes.
    BigInt(Rc<Vec<u8>>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<Vec<u8>>),
    Tuple(Rc<Node<Vec<Value>>>),
    List(Rc<RefCell<Node<Vec<Value>>>>),
    Dict(Rc<RefCell<Node<Vec<(Value, Value)>>>>),
    Global(Global),
    /// The result of `persistent_load`: the persistent id, as the caller mapped it.
    Persistent(Rc<dyn std::any::Any>),
    /// A tensor: storage (persistent), offset, size, stride.
    Tensor(Rc<TensorRef>),
    /// An inert object of a placeholder class.
    Object(String),
}

#[derive(Debug)]
pub struct TensorRef {
    pub storage: Value,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(n) => n.depth,
            Value::List(n) => n.borrow().depth,
            Value::Dict(n) => n.borrow().depth,
            _ => 0,
        }
    }

    fn freeze(&self) {
        match self {
            Value::List(n) => n.borrow_mut().frozen = true,
            Value::Dict(n) => n.borrow_mut().frozen = true,
            _ => {}
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(n) => Some(n.items.clone()),
            Value::List(n) => Some(n.borrow().items.clone()),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Persistent(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Object(_) => "object",
        }
    }
}

/// Builds a tuple, checking the depth bound and freezing the children.
fn tuple(items: Vec<Value>) -> R<Value> {
    let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(PickleError::Limit(format!(
            "containers nested deeper than {MAX_DEPTH}"
        )));
    }
    items.iter().for_each(Value::freeze);
    Ok(Value::Tuple(Rc::new(Node {
        items,
        depth,
        frozen: true,
    })))
}

fn new_list(items: Vec<Value>) -> R<Value> {
    let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(PickleError::Limit(format!(
            "containers nested deeper than {MAX_DEPTH}"
        )));
    }
    items.iter().for_each(Value::freeze);
    Ok(Value::List(Rc::new(RefCell::new(Node {
        items,
        depth,
        frozen: false,
    }))))
}

fn new_dict() -> Value {
    Value::Dict(Rc::new(RefCell::new(Node {
        items: vec![],
        depth: 1,
        frozen: false,
    })))
}

/// The machine. `persistent` maps a persistent id (BINPERSID) to a value.
pub struct Machine<'a, F: FnMut(Value) -> R<Value>> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<Vec<Value>>,
    memo: HashMap<u32, Value>,
    persistent: F,
    values: usize,
}

impl<'a, F: FnMut(Value) -> R<Value>> Machine<'a, F> {
    pub fn new(data: &'a [u8], persistent: F) -> Self {
        Machine {
            data,
            pos: 0,
            stack: vec![],
            marks: vec![],
            memo: HashMap::new(),
            persistent,
            values: 0,
        }
    }

    /// Bytes consumed so far (a stream may hold several pickles back to back).
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> R<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(PickleError::Truncated(what));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1, "opcode argument")?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, "opcode argument")?
                .try_into()
                .expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, "opcode argument")?
                .try_into()
                .expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, "opcode argument")?
                .try_into()
                .expect("8 bytes"),
        ))
    }
    fn line(&mut self) -> R<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated("text line"))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| self.bad("text argument is not UTF-8"))
    }
    fn bad(&self, msg: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            pos: self.pos,
            msg: msg.into(),
        }
    }
    fn push(&mut self, v: Value) -> R<()> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(PickleError::Limit(format!("more than {MAX_VALUES} values")));
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> R<Value> {
        self.stack.pop().ok_or_else(|| self.bad("stack underflow"))
    }
    fn top(&mut self) -> R<&mut Value> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            pos,
            msg: "stack underflow".into(),
        })
    }
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let items = std::mem::take(&mut self.stack);
        self.stack = self
            .marks
            .pop()
            .ok_or_else(|| self.bad("no MARK to pop to"))?;
        Ok(items)
    }
    fn sized(&mut self, n: u64, what: &'static str) -> R<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| PickleError::Truncated(what))?;
        self.take(n, what)
    }
    fn utf8(&self, b: &[u8]) -> R<Rc<str>> {
        std::str::from_utf8(b)
            .map(Rc::from)
            .map_err(|_| self.bad("string is not UTF-8"))
    }

    fn append(&mut self, target: &Value, items: Vec<Value>) -> R<()> {
        let Value::List(l) = target else {
            return Err(self.bad(format!("APPEND to a {}", target.kind())));
        };
        if l.borrow().frozen {
            return Err(self.bad("append to a list already placed in another container"));
        }
        // An unfrozen list is inside no other container, so only the list itself
        // could make a cycle: refuse it (found by fuzzing: DUP then APPEND).
        if items
            .iter()
            .any(|it| matches!(it, Value::List(x) if Rc::ptr_eq(x, l)))
        {
            return Err(self.bad("a list appended to itself"));
        }
        let depth = items.iter().map(Value::depth).max().map_or(0, |d| d + 1);
        if depth > MAX_DEPTH {
            return Err(PickleError::Limit(format!(
                "containers nested deeper than {MAX_DEPTH}"
            )));
        }
        items.iter().for_each(Value::freeze);
        let mut l = l.borrow_mut();
        l.depth = l.depth.max(depth);
        l.items.extend(items);
        Ok(())
    }

    fn set_items(&mut self, target: &Value, kv: Vec<Value>) -> R<()> {
        if !kv.len().is_multiple_of(2) {
            return Err(self.bad("SETITEMS with an odd number of values"));
        }
        let Value::Dict(d) = target else {
            return Err(self.bad(format!("SETITEM on a {}", target.kind())));
        };
        if d.borrow().frozen {
            return Err(self.bad("SETITEM on a dict already placed in another container"));
        }
        if kv
            .iter()
            .any(|it| matches!(it, Value::Dict(x) if Rc::ptr_eq(x, d)))
        {
            return Err(self.bad("a dict inserted into itself"));
        }
        let depth = kv.iter().map(Value::depth).max().map_or(0, |x| x + 1);
        if depth > MAX_DEPTH {
            return Err(PickleError::Limit(format!(
                "containers nested deeper than {MAX_DEPTH}"
            )));
        }
        kv.iter().for_each(Value::freeze);
        let mut d = d.borrow_mut();
        d.depth = d.depth.max(depth);
        let mut it = kv.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            // A later duplicate key replaces the earlier value, as in Python.
            if let Some(slot) = d
                .items
                .iter_mut()
                .find(|(ek, _)| matches!((ek, &k), (Value::Str(a), Value::Str(b)) if a == b))
            {
                slot.1 = v;
            } else {
                d.items.push((k, v));
            }
        }
        Ok(())
    }

    /// `callable(*args)` for an allowed global; builds a value, executes nothing.
    fn call(&mut self, f: Value, args: Value) -> R<Value> {
        let Value::Global(g) = f else {
            return Err(self.bad(format!("call of a {}", f.kind())));
        };
        let a = args
            .items()
            .ok_or_else(|| self.bad("call arguments are not a tuple"))?;
        let usize_of = |v: &Value, what: &str| -> R<usize> {
            v.as_int()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| self.bad(format!("{what} is not a non-negative int")))
        };
        let dims = |v: &Value, what: &str| -> R<Vec<usize>> {
            v.items()
                .ok_or_else(|| self.bad(format!("{what} is not a tuple")))?
                .iter()
                .map(|d| usize_of(d, what))
                .collect()
        };
        match g {
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                if a.len() < 4 {
                    return Err(self.bad("tensor rebuild with fewer than 4 arguments"));
                }
                if !matches!(a[0], Value::Persistent(_)) {
                    return Err(self.bad("tensor rebuild without a storage"));
                }
                let (size, stride) = (dims(&a[2], "tensor size")?, dims(&a[3], "tensor stride")?);
                if size.len() != stride.len() {
                    return Err(self.bad("tensor size and stride differ in length"));
                }
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: a[0].clone(),
                    offset: usize_of(&a[1], "storage offset")?,
                    size,
                    stride,
                })))
            }
            Global::RebuildParameter => match a.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err(self.bad("parameter rebuild without a tensor")),
            },
            Global::OrderedDict | Global::Dict | Global::DefaultDict => {
                let d = new_dict();
                // OrderedDict(items) with a list of pairs; defaultdict(factory) ignores it.
                if g == Global::OrderedDict
                    && let Some(items) = a.first().and_then(Value::items)
                {
                    let mut kv = Vec::new();
                    for p in items {
                        let pair = p
                            .items()
                            .filter(|p| p.len() == 2)
                            .ok_or_else(|| self.bad("OrderedDict item is not a pair"))?;
                        kv.extend(pair);
                    }
                    self.set_items(&d, kv)?;
                }
                Ok(d)
            }
            Global::Placeholder(name) => Ok(Value::Object(name)),
            Global::StorageType(_) => Err(self.bad("a storage type cannot be called")),
        }
    }

    /// Runs to STOP and returns the unpickled value.
    pub fn run(&mut self) -> R<Value> {
        loop {
            let at = self.pos;
            let op = self.take(1, "opcode")?[0];
            match op {
                0x80 => {
                    let p = self.u8()?; // PROTO
                    if p > 5 {
                        return Err(self.bad(format!("protocol {p}")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(), // STOP
                b'(' => {
                    if self.marks.len() >= MAX_DEPTH * 4 {
                        return Err(PickleError::Limit("too many nested MARKs".into()));
                    }
                    let s = std::mem::take(&mut self.stack);
                    self.marks.push(s);
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                b'I' => {
                    let l = self.line()?;
                    let v = match l {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(l.parse().map_err(|_| self.bad("INT argument"))?),
                    };
                    self.push(v)?
                }
                b'L' => {
                    let l = self.line()?.trim_end_matches('L');
                    let v = l.parse::<i64>().map_err(|_| self.bad("LONG argument"))?;
                    self.push(Value::Int(v))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let b = self.sized(n, "LONG bytes")?;
                    let v = if b.len() <= 8 {
                        let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                            [0xffu8; 8]
                        } else {
                            [0u8; 8]
                        };
                        buf[..b.len()].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(buf))
                    } else {
                        Value::BigInt(Rc::new(b.to_vec()))
                    };
                    self.push(v)?
                }
                b'G' => {
                    let v =
                        f64::from_be_bytes(self.take(8, "BINFLOAT")?.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))?
                }
                b'F' => {
                    let v = self
                        .line()?
                        .parse::<f64>()
                        .map_err(|_| self.bad("FLOAT argument"))?;
                    self.push(Value::Float(v))?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let b = self.sized(n, "string")?;
                    let s = self.utf8(b)?;
                    self.push(Value::Str(s))?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.u32()? as u64
                    } else {
                        self.u8()? as u64
                    };
                    let b = self.sized(n, "string")?;
                    let s = Rc::from(String::from_utf8_lossy(b).as_ref());
                    self.push(Value::Str(s))?
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let b = self.sized(n, "bytes")?.to_vec();
                    self.push(Value::Bytes(Rc::new(b)))?
                }
                b')' => self.push(tuple(vec![])?)?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(tuple(items)?)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.bad("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(tuple(items)?)?
                }
                b']' => self.push(new_list(vec![])?)?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(new_list(items)?)?
                }
                b'}' => self.push(new_dict())?,
                b'd' => {
                    let kv = self.pop_mark()?;
                    let d = new_dict();
                    self.set_items(&d, kv)?;
                    self.push(d)?
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?.clone();
                    self.append(&l, vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?.clone();
                    self.append(&l, items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?.clone();
                    self.set_items(&d, vec![k, v])?
                }
                b'u' => {
                    let kv = self.pop_mark()?;
                    let d = self.top()?.clone();
                    self.set_items(&d, kv)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?
                }
                b'p' => {
                    let i = self
                        .line()?
                        .parse::<u32>()
                        .map_err(|_| self.bad("PUT index"))?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'q' | b'r' => {
                    let i = if op == b'q' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32; // MEMOIZE
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'g' | b'h' | b'j' => {
                    let i = match op {
                        b'g' => self
                            .line()?
                            .parse::<u32>()
                            .map_err(|_| self.bad("GET index"))?,
                        b'h' => self.u8()? as u32,
                        _ => self.u32()?,
                    };
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or_else(|| self.bad(format!("memo index {i} was never stored")))?;
                    self.push(v)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let g = allowed(&module, &name)
                        .ok_or(PickleError::RefusedGlobal(format!("{module}.{name}")))?;
                    self.push(Value::Global(g))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        return Err(self.bad("STACK_GLOBAL without two strings"));
                    };
                    let g = allowed(m, n).ok_or(PickleError::RefusedGlobal(format!("{m}.{n}")))?;
                    self.push(Value::Global(g))?
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args)?;
                    self.push(v)?
                }
                0x81 => {
                    let args = self.pop()?; // NEWOBJ
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.push(v)?
                }
                0x92 => {
                    let _kwargs = self.pop()?; // NEWOBJ_EX
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: set an object's state. Dicts (OrderedDict's _metadata),
                    // placeholders and tensors keep no state here.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Object(_) | Value::Tensor(_) => {}
                        other => {
                            let k = other.kind();
                            return Err(self.bad(format!("BUILD on a {k}")));
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = (self.persistent)(pid)?;
                    self.push(v)?
                }
                b'P' => {
                    let pid = Value::Str(Rc::from(self.line()?));
                    let v = (self.persistent)(pid)?;
                    self.push(v)?
                }
                0x8f => self.push(new_list(vec![])?)?, // EMPTY_SET, kept as a list
                0x90 => {
                    let items = self.pop_mark()?; // ADDITEMS
                    let s = self.top()?.clone();
                    self.append(&s, items)?
                }
                0x91 => {
                    let items = self.pop_mark()?; // FROZENSET
                    self.push(tuple(items)?)?
                }
                _ => return Err(PickleError::Opcode(op, at)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(data: &[u8]) -> R<Value> {
        Machine::new(data, |_| {
            Err(PickleError::Malformed {
                pos: 0,
                msg: "no storages".into(),
            })
        })
        .run()
    }

    #[test]
    fn plain_values() {
        // {'a': [1, 2.5, 'x'], 'b': (True, None)} at protocol 2
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xeX\x01\x00\x00\x00b\x88N\x86u.";
        let v = run(p).unwrap();
        let Value::Dict(d) = v else {
            panic!("not a dict")
        };
        let d = d.borrow();
        assert_eq!(d.items.len(), 2);
        assert_eq!(d.items[0].0.as_str(), Some("a"));
        let l = d.items[0].1.items().unwrap();
        assert_eq!(l[0].as_int(), Some(1));
        assert!(matches!(l[1], Value::Float(f) if f == 2.5));
        assert_eq!(l[2].as_str(), Some("x"));
    }

    #[test]
    fn refuses_unknown_globals() {
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.";
        assert_eq!(
            run(p).unwrap_err(),
            PickleError::RefusedGlobal("posix.system".into())
        );
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert_eq!(
            run(p).unwrap_err(),
            PickleError::RefusedGlobal("builtins.eval".into())
        );
    }

    #[test]
    fn hostile_inputs_fail_fast() {
        // Deep nesting: 100 000 x EMPTY_LIST-in-tuple.
        let mut p = b"\x80\x02]".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 100_000));
        p.push(b'.');
        assert!(matches!(run(&p), Err(PickleError::Limit(_))));
        // Many MARKs.
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b'(', 100_000));
        assert!(matches!(run(&p), Err(PickleError::Limit(_))));
        // A declared size far beyond the data.
        assert!(matches!(
            run(b"\x80\x02X\xff\xff\xff\xff"),
            Err(PickleError::Truncated(_))
        ));
        assert!(matches!(
            run(b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff"),
            Err(PickleError::Truncated(_))
        ));
        // A huge memo index stores one entry, and an unknown one is an error.
        assert!(run(b"\x80\x02Nr\xff\xff\xff\xff.").is_ok());
        assert!(matches!(
            run(b"\x80\x02j\xff\xff\xff\xff."),
            Err(PickleError::Malformed { .. })
        ));
        // Billion laughs by memo: each level a tuple of 8 references to the
        // previous; values are shared, never copied.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..40 {
            p.push(b'(');
            for _ in 0..8 {
                p.extend_from_slice(b"h\x00");
            }
            p.extend_from_slice(b"tq\x00");
        }
        p.push(b'.');
        let t = std::time::Instant::now();
        assert!(run(&p).is_ok());
        assert!(t.elapsed().as_secs() < 2);
        // Truncated everywhere.
        let good = b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01u.";
        for n in 0..good.len() {
            assert!(run(&good[..n]).is_err(), "prefix {n}");
        }
        // Appending into a container after placing it elsewhere.
        assert!(run(b"\x80\x02]q\x00\x85h\x00K\x01a.").is_err());
        // A list appended to itself, a dict set into itself (fuzzing found the first).
        assert!(run(b"\x80\x02]2a.").is_err());
        assert!(run(b"\x80\x02}q\x00K\x01h\x00s.").is_err());
    }
}
