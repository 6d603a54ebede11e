//! Exact money.
//!
//! Every amount is a whole number of pico-dollars (1e-12 USD) held in an `i128`: prices are
//! whole pico-dollars per token, so `tokens × price` is exact and the sum of per-attempt costs
//! equals the bill for the same tokens to the last unit. Nothing here ever touches `f64`;
//! prices are parsed from their decimal text.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Sub};

use rust_decimal::{Decimal, RoundingStrategy};

/// Pico-dollars in one dollar.
pub const PICO_PER_USD: i128 = 1_000_000_000_000;

/// An exact amount of US dollars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(i128);

impl Usd {
    pub const ZERO: Usd = Usd(0);

    pub const fn from_pico(pico: i128) -> Self {
        Usd(pico)
    }

    pub const fn pico(self) -> i128 {
        self.0
    }

    /// The amount as an `i64` of pico-dollars for storage (±9.2 million dollars).
    pub fn to_pico_i64(self) -> Result<i64, MoneyError> {
        i64::try_from(self.0).map_err(|_| MoneyError::Overflow)
    }

    /// Parses a decimal dollar amount such as `"12.50"` or `"0.000001"`.
    pub fn parse(text: &str) -> Result<Self, MoneyError> {
        let d = parse_decimal(text)?;
        decimal_to_pico(d, 1).map(Usd)
    }

    /// The exact amount as a `Decimal` (for division and display).
    pub fn to_decimal(self) -> Decimal {
        // 12 decimal places fit in Decimal's 28 digits for any realistic amount.
        Decimal::from_i128_with_scale(self.0, 12).normalize()
    }

    /// Exact decimal text, trailing zeros removed: `"0.0375"`, `"12"`, `"0"`.
    pub fn to_decimal_string(self) -> String {
        let neg = self.0 < 0;
        let abs = self.0.unsigned_abs();
        let whole = abs / PICO_PER_USD as u128;
        let frac = abs % PICO_PER_USD as u128;
        let mut s = if neg {
            String::from("-")
        } else {
            String::new()
        };
        s.push_str(&whole.to_string());
        if frac != 0 {
            let f = format!("{frac:012}");
            s.push('.');
            s.push_str(f.trim_end_matches('0'));
        }
        s
    }

    /// A rounded figure for people: `$0.0123` (at least 2, at most `max_places` decimals).
    pub fn display_rounded(self, max_places: u32) -> String {
        let d = self
            .to_decimal()
            .round_dp_with_strategy(max_places, RoundingStrategy::MidpointAwayFromZero);
        let mut s = d.to_string();
        match s.find('.') {
            None => s.push_str(".00"),
            Some(p) if s.len() - p - 1 < 2 => {
                for _ in 0..(2 - (s.len() - p - 1)) {
                    s.push('0');
                }
            }
            _ => {}
        }
        format!("${s}")
    }

    /// This amount divided by `n`, rounded to 12 decimal places (for per-item averages,
    /// which are reporting figures, never ledger entries).
    pub fn per(self, n: u64) -> Option<Decimal> {
        if n == 0 {
            return None;
        }
        Some(
            (self.to_decimal() / Decimal::from(n))
                .round_dp_with_strategy(12, RoundingStrategy::MidpointAwayFromZero)
                .normalize(),
        )
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_decimal_string())
    }
}

/// Exact decimal text (`"0.0375"`), never a float.
impl serde::Serialize for Usd {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_decimal_string())
    }
}

impl<'de> serde::Deserialize<'de> for Usd {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Usd::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Add for Usd {
    type Output = Usd;
    fn add(self, rhs: Usd) -> Usd {
        Usd(self.0 + rhs.0)
    }
}

impl AddAssign for Usd {
    fn add_assign(&mut self, rhs: Usd) {
        self.0 += rhs.0;
    }
}

impl Sub for Usd {
    type Output = Usd;
    fn sub(self, rhs: Usd) -> Usd {
        Usd(self.0 - rhs.0)
    }
}

impl Sum for Usd {
    fn sum<I: Iterator<Item = Usd>>(iter: I) -> Usd {
        iter.fold(Usd::ZERO, Add::add)
    }
}

/// A price per token in whole pico-dollars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenPrice(i64);

impl TokenPrice {
    pub const ZERO: TokenPrice = TokenPrice(0);

    pub const fn from_pico_per_token(p: i64) -> Self {
        TokenPrice(p)
    }

    pub const fn pico_per_token(self) -> i64 {
        self.0
    }

    /// Parses a price in USD per million tokens (`"0.075"`), as pricing tables write it.
    pub fn per_million(text: &str) -> Result<Self, MoneyError> {
        let d = parse_decimal(text)?;
        // USD per million tokens × 1e12 pico / 1e6 tokens = × 1e6 pico per token.
        let pico = decimal_to_pico(d, 1_000_000)?;
        Self::checked(pico)
    }

    /// Parses a price in USD per token (`"7.5e-08"`), as LiteLLM's table writes it.
    pub fn per_token(text: &str) -> Result<Self, MoneyError> {
        let d = parse_decimal(text)?;
        let pico = decimal_to_pico(d, 1)?;
        Self::checked(pico)
    }

    fn checked(pico: i128) -> Result<Self, MoneyError> {
        if pico < 0 {
            return Err(MoneyError::Negative);
        }
        i64::try_from(pico)
            .map(TokenPrice)
            .map_err(|_| MoneyError::Overflow)
    }

    /// Exact cost of `tokens` tokens at this price.
    pub fn cost(self, tokens: u64) -> Usd {
        Usd(self.0 as i128 * tokens as i128)
    }

    /// The price in USD per million tokens, as exact decimal text.
    pub fn per_million_string(self) -> String {
        Usd::from_pico(self.0 as i128 * 1_000_000).to_decimal_string()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error("`{0}` is not a decimal number")]
    NotANumber(String),
    #[error(
        "the price is finer than a pico-dollar per token (1e-12 USD); nightshift keeps money exact and cannot round it"
    )]
    TooPrecise,
    #[error("the amount is too large")]
    Overflow,
    #[error("the amount is negative")]
    Negative,
}

fn parse_decimal(text: &str) -> Result<Decimal, MoneyError> {
    let t = text.trim();
    let parsed = if t.contains(['e', 'E']) {
        Decimal::from_scientific(t)
    } else {
        Decimal::from_str_exact(t)
    };
    parsed.map_err(|_| MoneyError::NotANumber(t.to_string()))
}

/// `d × 1e12 / divisor` as an exact integer, or an error if it is not whole.
fn decimal_to_pico(d: Decimal, divisor: i128) -> Result<i128, MoneyError> {
    // Decimal = mantissa × 10^-scale.
    let mantissa = d.mantissa();
    let scale = d.scale();
    // value in pico = mantissa × 10^(12 - scale) / divisor
    let mut num = mantissa;
    let mut den = divisor;
    if scale <= 12 {
        num = num
            .checked_mul(10i128.pow(12 - scale))
            .ok_or(MoneyError::Overflow)?;
    } else {
        den = den
            .checked_mul(10i128.pow(scale - 12))
            .ok_or(MoneyError::Overflow)?;
    }
    if num % den != 0 {
        return Err(MoneyError::TooPrecise);
    }
    Ok(num / den)
}

/// Formats an `f64` the way it was most likely written (shortest round-trip text), so a JSON
/// price such as `7.5e-08` is read as exactly 7.5e-08 and not as its binary neighbour.
pub fn f64_price_text(v: f64) -> String {
    // `{}` on f64 prints the shortest text that round-trips; `{:e}` keeps tiny values short.
    let plain = format!("{v}");
    if plain.len() <= 24 {
        plain
    } else {
        format!("{v:e}")
    }
}

/// A decimal number as written in a config file: decimal text (`"12.50"`), or a number read
/// back as its shortest text, so `0.1` means exactly one tenth, never its binary neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecimalText(pub String);

impl DecimalText {
    pub fn decimal(&self) -> Result<Decimal, MoneyError> {
        parse_decimal(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DecimalText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DecimalText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal number, e.g. \"0.075\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DecimalText, E> {
                Ok(DecimalText(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DecimalText, E> {
                Ok(DecimalText(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DecimalText, E> {
                Ok(DecimalText(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<DecimalText, E> {
                Ok(DecimalText(f64_price_text(v)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_million_prices_are_exact() {
        let p = TokenPrice::per_million("0.075").unwrap();
        assert_eq!(p.pico_per_token(), 75_000);
        assert_eq!(p.cost(1_000_000), Usd::parse("0.075").unwrap());
        assert_eq!(p.per_million_string(), "0.075");
        assert_eq!(
            TokenPrice::per_million("0.0025").unwrap().pico_per_token(),
            2_500
        );
    }

    #[test]
    fn per_token_prices_accept_scientific_text() {
        assert_eq!(
            TokenPrice::per_token("7.5e-08").unwrap().pico_per_token(),
            75_000
        );
        assert_eq!(
            TokenPrice::per_token("2.5e-09").unwrap().pico_per_token(),
            2_500
        );
        assert_eq!(
            TokenPrice::per_token("1.5E-6").unwrap().pico_per_token(),
            1_500_000
        );
        assert_eq!(
            TokenPrice::per_token(&f64_price_text(3.75e-08))
                .unwrap()
                .pico_per_token(),
            37_500
        );
    }

    #[test]
    fn prices_finer_than_a_pico_dollar_are_refused() {
        assert_eq!(TokenPrice::per_token("1e-13"), Err(MoneyError::TooPrecise));
        assert_eq!(
            TokenPrice::per_million("0.0000001"),
            Err(MoneyError::TooPrecise)
        );
        assert!(matches!(
            TokenPrice::per_million("abc"),
            Err(MoneyError::NotANumber(_))
        ));
        assert_eq!(TokenPrice::per_million("-1"), Err(MoneyError::Negative));
    }

    #[test]
    fn decimal_strings_are_exact_and_trimmed() {
        assert_eq!(Usd::from_pico(0).to_decimal_string(), "0");
        assert_eq!(Usd::from_pico(37_500).to_decimal_string(), "0.0000000375");
        assert_eq!(Usd::parse("12.5").unwrap().to_decimal_string(), "12.5");
        assert_eq!(Usd::from_pico(-1).to_decimal_string(), "-0.000000000001");
        assert_eq!(Usd::parse("1.005").unwrap().display_rounded(2), "$1.01");
        assert_eq!(Usd::parse("1.004").unwrap().display_rounded(2), "$1.00");
        assert_eq!(Usd::parse("3").unwrap().display_rounded(4), "$3.00");
        assert_eq!(Usd::parse("0.12345").unwrap().display_rounded(4), "$0.1235");
    }

    #[test]
    fn sums_of_parts_equal_the_whole() {
        let p = TokenPrice::per_million("0.6").unwrap();
        let parts: Usd = (0..1000u64).map(|t| p.cost(t)).sum();
        assert_eq!(parts, p.cost((0..1000u64).sum()));
    }

    #[test]
    fn per_item_average_is_rounded_not_truncated() {
        let total = Usd::parse("1").unwrap();
        assert_eq!(total.per(3).unwrap().to_string(), "0.333333333333");
        assert!(total.per(0).is_none());
    }
}
