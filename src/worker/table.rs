//! The results file as a table (CSV, Parquet): the columns an answer spreads over, read from
//! its JSON Schema in schema order so the header is the same every night whatever the answers
//! hold, the cells of one answer under them, and the columns of the source's fields. What no
//! column can hold (a field the schema does not describe, a value of another type than its
//! column's) goes to the answer's `_extra` column as JSON, so nothing of an answer is lost.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// What a column holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Int,
    Float,
    Bool,
    /// Compact JSON text: arrays, objects without described fields, values of several types.
    Json,
    /// Exact dollars (pico-dollars inside; decimal text in CSV, DECIMAL(38, 12) in Parquet).
    Usd,
}

/// One cell of a row.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cell {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Json(String),
    Usd(i128),
}

impl Cell {
    /// The cell as CSV text: no cell for null, JSON's spelling of numbers, and the formula
    /// guard (`plan::guard`) on text.
    pub(crate) fn csv_text(&self) -> String {
        match self {
            Cell::Null => String::new(),
            Cell::Text(s) | Cell::Json(s) => crate::plan::guard(s),
            Cell::Int(n) => n.to_string(),
            Cell::Float(f) => serde_json::Number::from_f64(*f)
                .map(|n| n.to_string())
                .unwrap_or_default(),
            Cell::Bool(b) => b.to_string(),
            Cell::Usd(p) => crate::cost::Usd::from_pico(*p).to_string(),
        }
    }
}

/// A column of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) nullable: bool,
}

impl Column {
    pub(crate) fn new(name: impl Into<String>, kind: Kind, nullable: bool) -> Column {
        Column {
            name: name.into(),
            kind,
            nullable,
        }
    }
}

/// Where an answer's field goes: a column, or the columns of its own fields.
#[derive(Debug)]
enum Shape {
    Leaf(Kind),
    Object(Vec<(String, Shape)>),
}

/// How one stage's answers spread over columns: a column per field the schema describes
/// (`<prefix>.<field>`, nested objects as `<prefix>.<a>.<b>`), in schema order, then
/// `<prefix>._extra`.
#[derive(Debug)]
pub(crate) struct AnswerLayout {
    fields: Vec<(String, Shape)>,
    columns: Vec<Column>,
}

impl AnswerLayout {
    /// The layout the schema (its text, so the order of its properties is kept) describes.
    pub(crate) fn from_schema(prefix: &str, schema: &str) -> Result<AnswerLayout, String> {
        let root: Box<RawValue> =
            serde_json::from_str(schema).map_err(|e| format!("not JSON: {e}"))?;
        let fields = match shape_of(&root, &root, 0) {
            Shape::Object(fields) => fields,
            Shape::Leaf(_) => Vec::new(),
        };
        let mut used = HashSet::new();
        let mut columns = Vec::new();
        let fields = assign(prefix, fields, &mut used, &mut columns);
        let mut extra = format!("{prefix}._extra");
        let mut bars = 1;
        while used.contains(&extra) {
            bars += 1;
            extra = format!("{prefix}.{}extra", "_".repeat(bars));
        }
        columns.push(Column::new(extra, Kind::Json, true));
        Ok(AnswerLayout { fields, columns })
    }

    pub(crate) fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// Pushes one cell per column for `answer` (`None`: the record has no answer).
    pub(crate) fn cells(&self, answer: Option<&Value>, out: &mut Vec<Cell>) {
        let rest = match answer {
            None | Some(Value::Null) => {
                nulls(&self.fields, out);
                None
            }
            Some(Value::Object(m)) => {
                let mut extra = Map::new();
                spread(&self.fields, m, out, &mut extra);
                (!extra.is_empty()).then_some(Value::Object(extra))
            }
            Some(other) => {
                nulls(&self.fields, out);
                Some(other.clone())
            }
        };
        out.push(rest.map_or(Cell::Null, |v| Cell::Json(v.to_string())));
    }
}

/// Names the leaves of `fields` under `prefix`, pushing their columns; a field whose name is
/// already taken (`"a.b"` beside `a` holding `b`) gets none and lands in `_extra`.
fn assign(
    prefix: &str,
    fields: Vec<(String, Shape)>,
    used: &mut HashSet<String>,
    columns: &mut Vec<Column>,
) -> Vec<(String, Shape)> {
    let mut kept = Vec::new();
    for (name, shape) in fields {
        let full = format!("{prefix}.{name}");
        match shape {
            Shape::Leaf(kind) => {
                if used.insert(full.clone()) {
                    columns.push(Column::new(full, kind, true));
                    kept.push((name, Shape::Leaf(kind)));
                }
            }
            Shape::Object(children) => {
                let children = assign(&full, children, used, columns);
                kept.push((name, Shape::Object(children)));
            }
        }
    }
    kept
}

fn nulls(fields: &[(String, Shape)], out: &mut Vec<Cell>) {
    for (_, shape) in fields {
        match shape {
            Shape::Leaf(_) => out.push(Cell::Null),
            Shape::Object(children) => nulls(children, out),
        }
    }
}

/// The cells of `obj` under `fields`; what they cannot hold goes into `extra`, keyed as in
/// the answer (a nested field under its object's key).
fn spread(
    fields: &[(String, Shape)],
    obj: &Map<String, Value>,
    out: &mut Vec<Cell>,
    extra: &mut Map<String, Value>,
) {
    for (name, shape) in fields {
        let v = obj.get(name);
        match shape {
            Shape::Leaf(kind) => match v.map(|v| (v, leaf(*kind, v))) {
                None => out.push(Cell::Null),
                Some((_, Some(cell))) => out.push(cell),
                Some((v, None)) => {
                    out.push(Cell::Null);
                    extra.insert(name.clone(), v.clone());
                }
            },
            Shape::Object(children) => match v {
                Some(Value::Object(m)) => {
                    let mut inner = Map::new();
                    spread(children, m, out, &mut inner);
                    if !inner.is_empty() {
                        extra.insert(name.clone(), Value::Object(inner));
                    }
                }
                None | Some(Value::Null) => nulls(children, out),
                Some(other) => {
                    nulls(children, out);
                    extra.insert(name.clone(), other.clone());
                }
            },
        }
    }
    for (k, v) in obj {
        if !fields.iter().any(|(name, _)| name == k) {
            extra.insert(k.clone(), v.clone());
        }
    }
}

/// `v` as a cell of a `kind` column; `None` when such a column cannot hold it exactly.
fn leaf(kind: Kind, v: &Value) -> Option<Cell> {
    if v.is_null() {
        return Some(Cell::Null);
    }
    match kind {
        Kind::Text => v.as_str().map(|s| Cell::Text(s.to_string())),
        Kind::Bool => v.as_bool().map(Cell::Bool),
        Kind::Int => {
            let n = v.as_number()?;
            n.as_i64()
                .or_else(|| {
                    let f = n.as_f64()?;
                    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
                })
                .map(Cell::Int)
        }
        Kind::Float => {
            let n = v.as_number()?;
            let f = n.as_f64()?;
            // An integer a float cannot hold exactly stays whole, in `_extra`.
            let exact = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => f as i64 == i && (i as f64) == f,
                (None, Some(u)) => f as u64 == u && (u as f64) == f,
                _ => true,
            };
            exact.then_some(Cell::Float(f))
        }
        Kind::Json => Some(Cell::Json(v.to_string())),
        Kind::Usd => None,
    }
}

/// A JSON object with its keys in the order written (the crate's `serde_json` sorts them).
struct Entries(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, Box<RawValue>>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl Entries {
    fn of(raw: &RawValue) -> Option<Entries> {
        serde_json::from_str(raw.get()).ok()
    }

    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    fn value(&self, key: &str) -> Option<Value> {
        self.get(key)
            .and_then(|r| serde_json::from_str(r.get()).ok())
    }
}

/// How deep `$ref`s are followed (a schema referring to itself stops there, as JSON).
const MAX_REFS: u32 = 16;

/// Where the values a schema node describes go.
fn shape_of(root: &RawValue, node: &RawValue, depth: u32) -> Shape {
    let Some(e) = Entries::of(node) else {
        return Shape::Leaf(Kind::Json);
    };
    if let Some(Value::String(r)) = e.value("$ref") {
        return match resolve(root, &r) {
            Some(target) if depth < MAX_REFS => shape_of(root, &target, depth + 1),
            _ => Shape::Leaf(Kind::Json),
        };
    }
    let types: Vec<String> = match e.value("type") {
        Some(Value::String(t)) => vec![t],
        Some(Value::Array(ts)) => ts
            .into_iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let types: Vec<&str> = types
        .iter()
        .map(String::as_str)
        .filter(|t| *t != "null")
        .collect();
    let properties = e.get("properties").and_then(Entries::of);
    if types == ["object"] || (types.is_empty() && properties.is_some()) {
        return match properties {
            Some(props) if !props.0.is_empty() => Shape::Object(
                props
                    .0
                    .iter()
                    .map(|(name, sub)| (name.clone(), shape_of(root, sub, depth)))
                    .collect(),
            ),
            _ => Shape::Leaf(Kind::Json),
        };
    }
    let kind = match types.as_slice() {
        ["string"] => Kind::Text,
        ["integer"] => Kind::Int,
        ["number"] | ["integer", "number"] | ["number", "integer"] => Kind::Float,
        ["boolean"] => Kind::Bool,
        [] => {
            let values = match (e.value("enum"), e.value("const")) {
                (Some(Value::Array(vs)), _) => vs,
                (_, Some(c)) => vec![c],
                _ => Vec::new(),
            };
            kind_of_values(&values)
        }
        _ => Kind::Json,
    };
    Shape::Leaf(kind)
}

/// The one kind every (non-null) value of an `enum` has, else JSON.
fn kind_of_values(values: &[Value]) -> Kind {
    let mut seen = Seen::default();
    for v in values {
        seen.observe(v);
    }
    if seen.nothing() {
        Kind::Json
    } else {
        seen.kind()
    }
}

/// The node a local `$ref` (`#/$defs/name`, a JSON pointer) points at.
fn resolve(root: &RawValue, reference: &str) -> Option<Box<RawValue>> {
    let pointer = reference.strip_prefix('#')?;
    let mut node = root.to_owned();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        node = match Entries::of(&node) {
            Some(e) => e.get(&seg)?.to_owned(),
            None => {
                let items: Vec<Box<RawValue>> = serde_json::from_str(node.get()).ok()?;
                items.into_iter().nth(seg.parse().ok()?)?
            }
        };
    }
    Some(node)
}

/// Which kinds of value a field held.
#[derive(Default, Debug)]
struct Seen {
    text: bool,
    int: bool,
    float: bool,
    /// An integer a float cannot hold exactly.
    big: bool,
    bool: bool,
    other: bool,
}

impl Seen {
    fn observe(&mut self, v: &Value) {
        match v {
            Value::Null => {}
            Value::String(_) => self.text = true,
            Value::Bool(_) => self.bool = true,
            Value::Number(n) => match n.as_i64() {
                Some(i) => {
                    self.int = true;
                    self.big |= (i as f64) as i64 != i;
                }
                None => {
                    self.float = true;
                    self.big |= n.as_u64().is_some();
                }
            },
            _ => self.other = true,
        }
    }

    fn nothing(&self) -> bool {
        !(self.text || self.int || self.float || self.bool || self.other)
    }

    /// The narrowest kind that holds every value seen exactly (text when none was seen).
    fn kind(&self) -> Kind {
        let numbers = self.int || self.float;
        match (self.text, numbers, self.bool, self.other) {
            (_, false, false, false) => Kind::Text,
            (false, false, true, false) => Kind::Bool,
            (false, true, false, false) if !self.float => Kind::Int,
            (false, true, false, false) if !self.big => Kind::Float,
            _ => Kind::Json,
        }
    }
}

/// The source's fields as `source.<field>` columns, in name order, each typed by the values
/// the run's records hold (a CSV source's are text).
#[derive(Default, Debug)]
pub(crate) struct SourceColumns {
    seen: BTreeMap<String, Seen>,
}

impl SourceColumns {
    /// Takes in one record's fields (a JSON object).
    pub(crate) fn observe(&mut self, record: &Map<String, Value>) {
        for (k, v) in record {
            self.seen.entry(k.clone()).or_default().observe(v);
        }
    }

    /// The columns, and the kind of each field in column order.
    pub(crate) fn columns(&self) -> Vec<Column> {
        self.seen
            .iter()
            .map(|(k, s)| Column::new(format!("source.{k}"), s.kind(), true))
            .collect()
    }

    /// Pushes one cell per column for a record's fields.
    pub(crate) fn cells(&self, record: Option<&Map<String, Value>>, out: &mut Vec<Cell>) {
        for (k, s) in &self.seen {
            let v = record.and_then(|r| r.get(k));
            out.push(match v {
                None => Cell::Null,
                // The kind was chosen to hold every value the records have.
                Some(v) => leaf(s.kind(), v).unwrap_or(Cell::Null),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SCHEMA: &str = r##"{
      "type": "object",
      "properties": {
        "title": {"type": "string"},
        "dims": {
          "type": "object",
          "properties": {
            "width": {"type": "integer"},
            "unit": {"enum": ["cm", "in"]},
            "depth": {"type": ["number", "null"]}
          }
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "ok": {"type": "boolean"},
        "dims.width": {"type": "string"},
        "any": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "size": {"$ref": "#/$defs/size"},
        "_extra": {"type": "string"}
      },
      "$defs": {"size": {"enum": [1, 2, 3]}}
    }"##;

    fn names(l: &AnswerLayout) -> Vec<(&str, Kind)> {
        l.columns()
            .iter()
            .map(|c| (c.name.as_str(), c.kind))
            .collect()
    }

    #[test]
    fn columns_follow_the_schema_order_nested_objects_flattened() {
        let l = AnswerLayout::from_schema("output", SCHEMA).unwrap();
        assert_eq!(
            names(&l),
            vec![
                ("output.title", Kind::Text),
                ("output.dims.width", Kind::Int),
                ("output.dims.unit", Kind::Text),
                ("output.dims.depth", Kind::Float),
                ("output.tags", Kind::Json),
                ("output.ok", Kind::Bool),
                // `dims.width` (the property) would collide with dims → width: no column.
                ("output.any", Kind::Json),
                ("output.size", Kind::Int),
                ("output._extra", Kind::Text),
                ("output.__extra", Kind::Json),
            ]
        );
    }

    /// The answer back from its cells: each column's value at its path, `_extra` merged in.
    fn rebuild(l: &AnswerLayout, cells: &[Cell]) -> Value {
        fn merge(into: &mut Value, from: Value) {
            match (into, from) {
                (Value::Object(a), Value::Object(b)) => {
                    for (k, v) in b {
                        merge(a.entry(k).or_insert(Value::Null), v);
                    }
                }
                (slot, v) => *slot = v,
            }
        }
        let mut out = json!({});
        let (extra, named) = cells.split_last().unwrap();
        for (c, cell) in l.columns().iter().zip(named) {
            let v = match cell {
                Cell::Null => continue,
                Cell::Text(s) => json!(s),
                Cell::Int(n) => json!(n),
                Cell::Float(f) => json!(f),
                Cell::Bool(b) => json!(b),
                Cell::Json(t) => serde_json::from_str(t).unwrap(),
                Cell::Usd(_) => unreachable!(),
            };
            let path: Vec<&str> = c.name["output.".len()..].split('.').collect();
            let mut slot = &mut out;
            for p in &path {
                slot = slot
                    .as_object_mut()
                    .unwrap()
                    .entry(p.to_string())
                    .or_insert(json!({}));
            }
            *slot = v;
        }
        if let Cell::Json(t) = extra {
            merge(&mut out, serde_json::from_str(t).unwrap());
        }
        out
    }

    #[test]
    fn nested_and_unknown_fields_are_spread_and_nothing_is_lost() {
        let l = AnswerLayout::from_schema("output", SCHEMA).unwrap();
        let answer = json!({
            "title": "=SUM(A1)",
            "dims": {"width": 30, "unit": "cm", "depth": 2.5, "colour": "red"},
            "tags": ["a", "b"],
            "ok": true,
            "dims.width": "dotted",
            "any": 7,
            "size": 2,
            "_extra": "a field named _extra",
            "note": {"free": [1, 2]},
        });
        let mut cells = Vec::new();
        l.cells(Some(&answer), &mut cells);
        assert_eq!(
            cells,
            vec![
                Cell::Text("=SUM(A1)".into()),
                Cell::Int(30),
                Cell::Text("cm".into()),
                Cell::Float(2.5),
                Cell::Json(r#"["a","b"]"#.into()),
                Cell::Bool(true),
                Cell::Json("7".into()),
                Cell::Int(2),
                Cell::Text("a field named _extra".into()),
                Cell::Json(
                    json!({"dims": {"colour": "red"}, "dims.width": "dotted", "note": {"free": [1, 2]}})
                        .to_string()
                ),
            ]
        );
        assert_eq!(rebuild(&l, &cells), answer);
        // CSV text: the formula guard on text, numbers as JSON spells them.
        assert_eq!(cells[0].csv_text(), "'=SUM(A1)");
        assert_eq!(cells[3].csv_text(), "2.5");
    }

    #[test]
    fn values_a_column_cannot_hold_go_to_extra_and_nulls_are_empty() {
        let l = AnswerLayout::from_schema("stage.s", SCHEMA).unwrap();
        let answer = json!({"dims": "not an object", "ok": "yes", "size": 2.0, "tags": null});
        let mut cells = Vec::new();
        l.cells(Some(&answer), &mut cells);
        assert_eq!(cells[1..4], [Cell::Null, Cell::Null, Cell::Null]);
        assert_eq!(cells[5], Cell::Null);
        assert_eq!(cells[7], Cell::Int(2));
        assert_eq!(
            cells.last().unwrap(),
            &Cell::Json(json!({"dims": "not an object", "ok": "yes"}).to_string())
        );
        // No answer: every cell null, nothing extra.
        let mut none = Vec::new();
        l.cells(None, &mut none);
        assert_eq!(none.len(), l.columns().len());
        assert!(none.iter().all(|c| *c == Cell::Null));
        // An answer that is not an object goes whole into `_extra`.
        let mut odd = Vec::new();
        l.cells(Some(&json!([1, 2])), &mut odd);
        assert_eq!(odd.last().unwrap(), &Cell::Json("[1,2]".into()));
    }

    #[test]
    fn a_float_column_keeps_big_integers_whole_in_extra() {
        let l = AnswerLayout::from_schema(
            "output",
            r#"{"type":"object","properties":{"x":{"type":"number"}}}"#,
        )
        .unwrap();
        let mut cells = Vec::new();
        l.cells(Some(&json!({"x": 9007199254740993u64})), &mut cells);
        assert_eq!(
            cells,
            vec![Cell::Null, Cell::Json(r#"{"x":9007199254740993}"#.into())]
        );
    }

    #[test]
    fn source_columns_are_typed_by_the_values_seen() {
        let mut s = SourceColumns::default();
        for r in [
            json!({"id": "a", "n": 1, "price": 2, "flag": true, "mixed": "x", "tags": [1]}),
            json!({"id": "b", "n": 2, "price": 2.5, "flag": null, "mixed": 3}),
        ] {
            s.observe(r.as_object().unwrap());
        }
        let cols: Vec<(String, Kind)> = s.columns().into_iter().map(|c| (c.name, c.kind)).collect();
        assert_eq!(
            cols,
            vec![
                ("source.flag".into(), Kind::Bool),
                ("source.id".into(), Kind::Text),
                ("source.mixed".into(), Kind::Json),
                ("source.n".into(), Kind::Int),
                ("source.price".into(), Kind::Float),
                ("source.tags".into(), Kind::Json),
            ]
        );
        let mut cells = Vec::new();
        s.cells(
            json!({"id": "b", "n": 2, "price": 2, "mixed": "x"}).as_object(),
            &mut cells,
        );
        assert_eq!(
            cells,
            vec![
                Cell::Null,
                Cell::Text("b".into()),
                Cell::Json(r#""x""#.into()),
                Cell::Int(2),
                Cell::Float(2.0),
                Cell::Null,
            ]
        );
    }
}
