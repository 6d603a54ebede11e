//! The results file as Parquet: the table's columns (`table.rs`) typed (text, int64,
//! float64, boolean, DECIMAL(38, 12) for dollars), snappy-compressed, one row group per page
//! of rows read from the store, so what is held in memory is one page, not the run.

use std::io::Write;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Decimal128Builder, Float64Builder, Int64Builder, StringBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::table::{Cell, Column, Kind};

/// Digits and decimal places of a dollar amount: exact pico-dollars.
const USD_PRECISION: u8 = 38;
const USD_SCALE: i8 = 12;

/// One column being filled.
enum Builder {
    Text(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Usd(Decimal128Builder),
}

impl Builder {
    fn push(&mut self, cell: &Cell) {
        match (self, cell) {
            (Builder::Text(b), Cell::Text(s) | Cell::Json(s)) => b.append_value(s),
            (Builder::Int(b), Cell::Int(n)) => b.append_value(*n),
            (Builder::Float(b), Cell::Float(f)) => b.append_value(*f),
            (Builder::Bool(b), Cell::Bool(v)) => b.append_value(*v),
            (Builder::Usd(b), Cell::Usd(p)) => b.append_value(*p),
            // The table gives each column only cells of its kind, or null.
            (Builder::Text(b), _) => b.append_null(),
            (Builder::Int(b), _) => b.append_null(),
            (Builder::Float(b), _) => b.append_null(),
            (Builder::Bool(b), _) => b.append_null(),
            (Builder::Usd(b), _) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Text(b) => Arc::new(b.finish()),
            Builder::Int(b) => Arc::new(b.finish()),
            Builder::Float(b) => Arc::new(b.finish()),
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Usd(b) => Arc::new(b.finish()),
        }
    }
}

fn data_type(kind: Kind) -> DataType {
    match kind {
        Kind::Text | Kind::Json => DataType::Utf8,
        Kind::Int => DataType::Int64,
        Kind::Float => DataType::Float64,
        Kind::Bool => DataType::Boolean,
        Kind::Usd => DataType::Decimal128(USD_PRECISION, USD_SCALE),
    }
}

/// A Parquet file being written, a page of rows at a time.
pub(crate) struct ParquetSink<W: Write + Send> {
    writer: ArrowWriter<W>,
    schema: SchemaRef,
    builders: Vec<Builder>,
    rows: usize,
}

impl<W: Write + Send> ParquetSink<W> {
    pub(crate) fn new(out: W, columns: &[Column]) -> std::io::Result<Self> {
        let schema: SchemaRef = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(&c.name, data_type(c.kind), c.nullable))
                .collect::<Vec<_>>(),
        ));
        let builders = columns
            .iter()
            .map(|c| {
                Ok(match c.kind {
                    Kind::Text | Kind::Json => Builder::Text(StringBuilder::new()),
                    Kind::Int => Builder::Int(Int64Builder::new()),
                    Kind::Float => Builder::Float(Float64Builder::new()),
                    Kind::Bool => Builder::Bool(BooleanBuilder::new()),
                    Kind::Usd => Builder::Usd(
                        Decimal128Builder::new()
                            .with_precision_and_scale(USD_PRECISION, USD_SCALE)
                            .map_err(std::io::Error::other)?,
                    ),
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            // Row groups end where pages do (`end_page`), never in between.
            .set_max_row_group_row_count(None)
            .build();
        let writer = ArrowWriter::try_new(out, schema.clone(), Some(props))
            .map_err(std::io::Error::other)?;
        Ok(ParquetSink {
            writer,
            schema,
            builders,
            rows: 0,
        })
    }

    /// Adds a row: one cell per column, in column order.
    pub(crate) fn push(&mut self, row: &[Cell]) {
        debug_assert_eq!(row.len(), self.builders.len());
        for (b, cell) in self.builders.iter_mut().zip(row) {
            b.push(cell);
        }
        self.rows += 1;
    }

    /// Writes the rows pushed since the last page as one row group.
    pub(crate) fn end_page(&mut self) -> std::io::Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        self.rows = 0;
        let arrays: Vec<ArrayRef> = self.builders.iter_mut().map(Builder::finish).collect();
        let batch =
            RecordBatch::try_new(self.schema.clone(), arrays).map_err(std::io::Error::other)?;
        self.writer.write(&batch).map_err(std::io::Error::other)?;
        self.writer.flush().map_err(std::io::Error::other)
    }

    /// Writes what is left and the footer.
    pub(crate) fn finish(mut self) -> std::io::Result<()> {
        self.end_page()?;
        self.writer.close().map_err(std::io::Error::other)?;
        Ok(())
    }
}
