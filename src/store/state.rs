//! The states and modes the store keeps, as enums: [`ItemState`], [`BatchState`],
//! [`AttemptState`], [`EndState`], [`BatchMode`] and [`RunStatus`] (docs/design.md, "The
//! model").
//!
//! Each value's [`as_str`](BatchState::as_str) is the exact text stored in its column (the
//! `CHECK` constraints of `migrations/sqlite` and `migrations/postgres` list the same
//! values), so the types add nothing to the on-disk format. Parsing a stored value
//! that is not one of them fails with [`UnknownValue`], which names the column kind.

use std::fmt;
use std::str::FromStr;

/// A stored state or mode that is not one this build knows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?} (expected one of: {})", .expected.join(", "))]
pub struct UnknownValue {
    /// What was parsed (`batch state`, `item state`, …).
    pub kind: &'static str,
    pub value: String,
    /// The values it may take.
    pub expected: &'static [&'static str],
}

/// Defines a stored enum: its variants with their stored text, `as_str`, `ALL`, `Display`,
/// `FromStr`, `TryFrom<&str>`, `TryFrom<String>` and `Serialize` (as the text).
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the order of its life cycle.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The text stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        kind: $kind,
                        value: s.to_string(),
                        expected: &[$($text,)+],
                    }),
                }
            }
        }

        impl TryFrom<&str> for $name {
            type Error = UnknownValue;

            fn try_from(s: &str) -> Result<Self, UnknownValue> {
                s.parse()
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownValue;

            fn try_from(s: String) -> Result<Self, UnknownValue> {
                s.parse()
            }
        }

        /// Serialises as its stored text (reports show what the store holds).
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

stored_enum! {
    /// An item: `pending → in_flight → succeeded | failed → in_flight … → exhausted`.
    ItemState, "item state" {
        /// Never attempted.
        Pending => "pending",
        /// In a batch that has not been ingested.
        InFlight => "in_flight",
        Succeeded => "succeeded",
        /// Its last attempt failed; it will be retried (under `max_attempts`).
        Failed => "failed",
        /// Failed for good (at the attempt cap, or a request that can never be sent).
        Exhausted => "exhausted",
    }
}

stored_enum! {
    /// A batch: `planned → built → uploading → uploaded → creating → submitted → ended →
    /// ingested` (online batches go `planned → submitted → ingested`).
    BatchState, "batch state" {
        /// Its items and attempts are chosen; nothing is written or sent.
        Planned => "planned",
        /// Its input file is written.
        Built => "built",
        /// The upload of its input file may have started.
        Uploading => "uploading",
        Uploaded => "uploaded",
        /// The provider's create may have been sent (reconcile before sending it again).
        Creating => "creating",
        Submitted => "submitted",
        /// The provider job is over (see [`EndState`]); its results are not yet applied.
        Ended => "ended",
        /// Its results are applied: closed.
        Ingested => "ingested",
    }
}

stored_enum! {
    /// An attempt: `in_flight → succeeded | failed`.
    AttemptState, "attempt state" {
        InFlight => "in_flight",
        Succeeded => "succeeded",
        Failed => "failed",
    }
}

stored_enum! {
    /// How a batch's provider job ended (`batches.end_state`).
    EndState, "batch end state" {
        Completed => "completed",
        Failed => "failed",
        Expired => "expired",
        Cancelled => "cancelled",
        /// The provider no longer knows the job.
        Lost => "lost",
    }
}

stored_enum! {
    /// How a batch is sent (`batches.mode`).
    BatchMode, "batch mode" {
        /// A provider batch job.
        Batch => "batch",
        /// Real-time calls the runner makes itself.
        Online => "online",
    }
}

stored_enum! {
    /// Why an attempt ended as it did (`attempts.verdict`): the judgment of its answer, or what
    /// happened to its batch.
    AttemptVerdict, "attempt verdict" {
        /// A valid answer.
        Ok => "ok",
        /// The answer is not JSON.
        InvalidJson => "invalid_json",
        /// JSON the schema does not allow.
        SchemaInvalid => "schema_invalid",
        /// The model ran out of output tokens.
        Truncated => "truncated",
        /// The model refused.
        Refused => "refused",
        /// No content.
        Empty => "empty",
        /// The provider answered this request with an error.
        ProviderError => "provider_error",
        /// The provider failed the whole batch.
        BatchFailed => "batch_failed",
        /// The provider refused to create the batch.
        BatchRejected => "batch_rejected",
        /// The batch expired before this request ran.
        Expired => "expired",
        /// The batch was cancelled before this request ran.
        Cancelled => "cancelled",
        /// The batch, or the online call, is lost.
        Lost => "lost",
        /// No result came back for this request.
        Missing => "missing",
    }
}

stored_enum! {
    /// A run: `running → completed | failed | budget | interrupted | detached | error`.
    RunStatus, "run status" {
        Running => "running",
        Completed => "completed",
        /// Over, with items that failed for good.
        Failed => "failed",
        /// Stopped by its spending cap with items left to send.
        Budget => "budget",
        Interrupted => "interrupted",
        Detached => "detached",
        Error => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T])
    where
        T: Copy + fmt::Display + FromStr<Err = UnknownValue> + PartialEq + fmt::Debug,
    {
        for v in all {
            assert_eq!(v.to_string().parse::<T>(), Ok(*v));
        }
    }

    #[test]
    fn every_value_round_trips_through_its_stored_text() {
        round_trips(ItemState::ALL);
        round_trips(BatchState::ALL);
        round_trips(AttemptState::ALL);
        round_trips(EndState::ALL);
        round_trips(BatchMode::ALL);
        round_trips(RunStatus::ALL);
        round_trips(AttemptVerdict::ALL);
        // The verdicts are the texts earlier versions stored, unchanged (reports read old rows).
        let texts: Vec<&str> = AttemptVerdict::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(
            texts,
            [
                "ok",
                "invalid_json",
                "schema_invalid",
                "truncated",
                "refused",
                "empty",
                "provider_error",
                "batch_failed",
                "batch_rejected",
                "expired",
                "cancelled",
                "lost",
                "missing"
            ]
        );
    }

    #[test]
    fn stored_texts_are_the_ones_the_migrations_check_for() {
        let texts = |v: &[&'static str]| v.join(",");
        assert_eq!(
            texts(
                &ItemState::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
            ),
            "pending,in_flight,succeeded,failed,exhausted"
        );
        assert_eq!(
            texts(
                &BatchState::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
            ),
            "planned,built,uploading,uploaded,creating,submitted,ended,ingested"
        );
        assert_eq!(
            texts(
                &AttemptState::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
            ),
            "in_flight,succeeded,failed"
        );
        assert_eq!(
            texts(&EndState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
            "completed,failed,expired,cancelled,lost"
        );
        assert_eq!(
            texts(
                &BatchMode::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
            ),
            "batch,online"
        );
        assert_eq!(
            texts(
                &RunStatus::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
            ),
            "running,completed,failed,budget,interrupted,detached,error"
        );
    }

    #[test]
    fn unknown_values_are_refused_with_their_kind() {
        let e = "sent".parse::<BatchState>().unwrap_err();
        assert_eq!(e.kind, "batch state");
        assert_eq!(e.value, "sent");
        assert!(
            e.to_string().contains("unknown batch state \"sent\""),
            "{e}"
        );
        assert!(e.to_string().contains("planned"), "{e}");
        assert!(ItemState::try_from("Pending").is_err());
        assert!(BatchMode::try_from(String::from("")).is_err());
    }
}
