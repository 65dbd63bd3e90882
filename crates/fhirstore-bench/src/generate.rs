//! A deterministic generator of realistic clinical data for benchmarks.
//!
//! Each patient comes with a few years of care: ambulatory, emergency and inpatient Encounters;
//! vital signs and laboratory Observations with LOINC codes and values drawn from plausible
//! distributions; chronic Conditions (SNOMED CT) by age-dependent prevalence; and the
//! MedicationRequests (RxNorm) that treat them. The same `(patients, seed)` always yields the
//! same resources, byte for byte, so runs on different stores and days compare.

use serde_json::{json, Value};

/// SplitMix64: small, fast, and good enough for test data; no dependency needed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Normal by Box–Muller.
    fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// An index into `weights`, with probability proportional to its weight.
    fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

/// The day generated histories end on, fixed so output does not depend on when it runs.
const END_DAY: i64 = 20_454; // 2026-01-01, in days since 1970-01-01
const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const UCUM: &str = "http://unitsofmeasure.org";

/// Family names, most common first; drawn with Zipf-like weights.
pub const FAMILIES: [&str; 24] = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
];
const GIVEN_F: [&str; 12] = [
    "Mary",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Lisa",
    "Nancy",
];
const GIVEN_M: [&str; 12] = [
    "James",
    "Robert",
    "John",
    "Michael",
    "David",
    "William",
    "Richard",
    "Joseph",
    "Thomas",
    "Charles",
    "Christopher",
    "Daniel",
];
const CITIES: [(&str, &str, &str); 6] = [
    ("Boston", "MA", "02118"),
    ("Springfield", "MA", "01103"),
    ("Worcester", "MA", "01608"),
    ("Cambridge", "MA", "02139"),
    ("Lowell", "MA", "01852"),
    ("Quincy", "MA", "02169"),
];

/// Chronic conditions: SNOMED code, display, prevalence among adults, and the RxNorm
/// medication that treats it.
pub const CONDITIONS: [(&str, &str, f64, (&str, &str)); 7] = [
    (
        "38341003",
        "Hypertension",
        0.30,
        ("314076", "lisinopril 10 MG Oral Tablet"),
    ),
    (
        "55822004",
        "Hyperlipidemia",
        0.25,
        ("617312", "atorvastatin 20 MG Oral Tablet"),
    ),
    (
        "44054006",
        "Diabetes mellitus type 2",
        0.11,
        ("860975", "metformin 500 MG Oral Tablet"),
    ),
    (
        "195967001",
        "Asthma",
        0.08,
        ("745679", "albuterol 90 MCG/ACTUAT Inhaler"),
    ),
    (
        "35489007",
        "Depressive disorder",
        0.08,
        ("312940", "sertraline 50 MG Oral Tablet"),
    ),
    (
        "13645005",
        "Chronic obstructive lung disease",
        0.05,
        ("896188", "fluticasone/salmeterol Inhaler"),
    ),
    ("162864005", "Body mass index 30+ - obesity", 0.20, ("", "")),
];

/// Vital signs and laboratory tests: LOINC code, display, unit, mean, standard deviation,
/// category, and the share of encounters that record it.
pub const MEASURES: [(&str, &str, &str, f64, f64, &str, f64); 8] = [
    (
        "8867-4",
        "Heart rate",
        "/min",
        74.0,
        11.0,
        "vital-signs",
        0.9,
    ),
    (
        "29463-7",
        "Body weight",
        "kg",
        78.0,
        16.0,
        "vital-signs",
        0.8,
    ),
    (
        "8302-2",
        "Body height",
        "cm",
        169.0,
        10.0,
        "vital-signs",
        0.5,
    ),
    (
        "39156-5",
        "Body mass index",
        "kg/m2",
        27.5,
        5.0,
        "vital-signs",
        0.5,
    ),
    (
        "8310-5",
        "Body temperature",
        "Cel",
        36.8,
        0.4,
        "vital-signs",
        0.6,
    ),
    (
        "2339-0",
        "Glucose",
        "mg/dL",
        101.0,
        22.0,
        "laboratory",
        0.25,
    ),
    (
        "4548-4",
        "Hemoglobin A1c",
        "%",
        5.8,
        0.9,
        "laboratory",
        0.12,
    ),
    (
        "2093-3",
        "Cholesterol",
        "mg/dL",
        195.0,
        38.0,
        "laboratory",
        0.15,
    ),
];

/// The blood pressure panel, recorded at most encounters, with systolic and diastolic
/// components.
pub const BP_PANEL: &str = "85354-9";

fn date(day: i64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date dependency.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn instant(day: i64, minute: i64) -> String {
    format!(
        "{}T{:02}:{:02}:00Z",
        date(day),
        (minute / 60) % 24,
        minute % 60
    )
}

fn round(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}], "text": display})
}

/// One patient's resources, the Patient first; ids are `p{index}` and `p{index}-…`, so
/// references resolve within and across patients of one run.
pub fn patient_record(rng: &mut Rng, index: usize) -> Vec<Value> {
    let pid = format!("p{index}");
    let female = rng.chance(0.51);
    // Ages 0-99, fewer of the very old.
    let age_years = (rng.unit().powf(1.15) * 100.0) as i64;
    let birth_day = END_DAY - age_years * 365 - rng.below(365) as i64;
    let zipf: Vec<f64> = (1..=FAMILIES.len()).map(|k| 1.0 / k as f64).collect();
    let family = FAMILIES[rng.weighted(&zipf)];
    let given = if female { &GIVEN_F } else { &GIVEN_M }[rng.below(12)];
    let (city, state, zip) = CITIES[rng.weighted(&[6.0, 2.0, 2.0, 1.5, 1.0, 1.0])];
    let mut out = vec![json!({
        "resourceType": "Patient",
        "id": pid,
        "identifier": [
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
             "system": "urn:oid:2.16.840.1.113883.19.5", "value": format!("MRN{index:08}")},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": format!("999-{:02}-{:04}", index % 100, rng.below(10_000))}
        ],
        "active": true,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": format!("555-{:03}-{:04}", rng.below(1000), rng.below(10_000)), "use": "home"}],
        "gender": if female { "female" } else { "male" },
        "birthDate": date(birth_day),
        "address": [{"line": [format!("{} Main Street", 1 + rng.below(999))], "city": city, "state": state,
                     "postalCode": zip, "country": "US"}],
        "maritalStatus": coding("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            if age_years > 25 && rng.chance(0.55) { "M" } else { "S" },
            if age_years > 25 { "Married" } else { "Never Married" })
    })];
    let subject = json!({"reference": format!("Patient/{pid}")});
    // Conditions, more likely with age; each may bring its medication.
    let mut conditions = Vec::new();
    let age_factor = (age_years as f64 / 50.0).min(1.6);
    for (k, (code, display, prevalence, _)) in CONDITIONS.iter().enumerate() {
        if age_years >= 18 && rng.chance(prevalence * age_factor) {
            let onset = END_DAY - rng.below(((age_years - 17) * 365) as usize) as i64;
            conditions.push((k, onset));
            out.push(json!({
                "resourceType": "Condition",
                "id": format!("{pid}-c{k}"),
                "clinicalStatus": coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
                "verificationStatus": coding("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
                "category": [coding("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item", "Problem List Item")],
                "code": coding(SNOMED, code, display),
                "subject": subject,
                "onsetDateTime": date(onset),
                "recordedDate": date(onset)
            }));
        }
    }
    // Encounters over the last five years (fewer for the young), geometric in number.
    let mut encounters = 1;
    while encounters < 12 && rng.chance(0.72) {
        encounters += 1;
    }
    let span = (5 * 365).min(age_years * 365 + 1);
    let mut obs = 0;
    for e in 0..encounters {
        let day = END_DAY - rng.below(span as usize) as i64;
        let minute = 8 * 60 + rng.below(10 * 60) as i64;
        let (class, class_display, type_code, type_display, minutes) =
            match rng.weighted(&[0.82, 0.11, 0.07]) {
                0 => (
                    "AMB",
                    "ambulatory",
                    "185349003",
                    "Encounter for check up",
                    30,
                ),
                1 => (
                    "EMER",
                    "emergency",
                    "50849002",
                    "Emergency room admission",
                    240,
                ),
                _ => (
                    "IMP",
                    "inpatient encounter",
                    "32485007",
                    "Hospital admission",
                    3 * 1440,
                ),
            };
        let eid = format!("{pid}-e{e}");
        out.push(json!({
            "resourceType": "Encounter",
            "id": eid,
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class, "display": class_display},
            "type": [coding(SNOMED, type_code, type_display)],
            "subject": subject,
            "period": {"start": instant(day, minute), "end": instant(day + (minute + minutes) / 1440, (minute + minutes) % 1440)}
        }));
        let encounter = json!({"reference": format!("Encounter/{eid}")});
        let when = instant(day, minute + 10);
        let mut observe = |out: &mut Vec<Value>, mut body: Value| {
            body["id"] = json!(format!("{pid}-o{obs}"));
            body["status"] = json!("final");
            body["subject"] = subject.clone();
            body["encounter"] = encounter.clone();
            body["effectiveDateTime"] = json!(when);
            body["issued"] = json!(when);
            out.push(body);
            obs += 1;
        };
        if age_years >= 3 && rng.chance(0.85) {
            let hypertensive = conditions.iter().any(|(k, _)| *k == 0);
            let systolic = rng.normal(if hypertensive { 138.0 } else { 118.0 }, 12.0);
            let diastolic = rng.normal(if hypertensive { 88.0 } else { 76.0 }, 8.0);
            let component = |code: &str, display: &str, v: f64| {
                json!({"code": coding(LOINC, code, display),
                       "valueQuantity": {"value": v.round(), "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}})
            };
            observe(
                &mut out,
                json!({"resourceType": "Observation",
                    "category": [coding("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs", "Vital Signs")],
                    "code": coding(LOINC, BP_PANEL, "Blood pressure panel with all children optional"),
                    "component": [component("8480-6", "Systolic blood pressure", systolic),
                                  component("8462-4", "Diastolic blood pressure", diastolic)]}),
            );
        }
        for (code, display, unit, mean, sd, category, share) in MEASURES {
            if !rng.chance(share) {
                continue;
            }
            let diabetic = conditions.iter().any(|(k, _)| *k == 2);
            let shift = if diabetic && (code == "2339-0" || code == "4548-4") {
                1.45
            } else {
                1.0
            };
            let value = round(rng.normal(mean * shift, sd).max(mean * 0.2), 1);
            observe(
                &mut out,
                json!({"resourceType": "Observation",
                    "category": [coding("http://terminology.hl7.org/CodeSystem/observation-category", category,
                        if category == "laboratory" { "Laboratory" } else { "Vital Signs" })],
                    "code": coding(LOINC, code, display),
                    "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}),
            );
        }
    }
    for (n, (k, onset)) in conditions.iter().enumerate() {
        let (rx, rx_display) = CONDITIONS[*k].3;
        if rx.is_empty() || !rng.chance(0.8) {
            continue;
        }
        out.push(json!({
            "resourceType": "MedicationRequest",
            "id": format!("{pid}-m{n}"),
            "status": if rng.chance(0.85) { "active" } else { "stopped" },
            "intent": "order",
            "medicationCodeableConcept": coding(RXNORM, rx, rx_display),
            "subject": subject,
            "authoredOn": date(*onset),
            "reasonReference": [{"reference": format!("Condition/{pid}-c{k}")}],
            "dosageInstruction": [{"text": "Take as directed", "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}]
        }));
    }
    out
}

/// Every resource for `patients` patients from `seed`, patient by patient.
pub fn records(patients: usize, seed: u64) -> impl Iterator<Item = Vec<Value>> {
    let mut rng = Rng::new(seed);
    (0..patients).map(move |i| patient_record(&mut rng, i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn ndjson(patients: usize, seed: u64) -> String {
        records(patients, seed)
            .flatten()
            .map(|r| r.to_string() + "\n")
            .collect()
    }

    #[test]
    fn output_depends_only_on_count_and_seed() {
        assert_eq!(ndjson(30, 7), ndjson(30, 7));
        assert_ne!(ndjson(30, 7), ndjson(30, 8));
        // A larger run starts with the smaller one.
        assert!(ndjson(40, 7).starts_with(&ndjson(30, 7)));
    }

    #[test]
    fn resources_are_valid_and_references_resolve() {
        let all: Vec<Value> = records(200, 1).flatten().collect();
        let mut ids = HashSet::new();
        let mut by_type: HashMap<String, usize> = HashMap::new();
        for r in &all {
            let t = r["resourceType"].as_str().expect("type").to_owned();
            let id = r["id"].as_str().expect("id");
            assert!(fhirstore_core::LogicalId::new(id).is_ok(), "{id}");
            assert!(ids.insert(format!("{t}/{id}")), "duplicate {t}/{id}");
            *by_type.entry(t).or_default() += 1;
        }
        for r in &all {
            for field in ["subject", "encounter"] {
                if let Some(target) = r[field]["reference"].as_str() {
                    assert!(ids.contains(target), "{target} dangles");
                }
            }
        }
        let validator = fhirstore_core::validate::SchemaValidator::r4().expect("schema");
        for r in all.iter().step_by(7) {
            validator.validate(r).expect("valid R4");
        }
        // Realistic proportions: every type present, Observations the bulk.
        assert_eq!(by_type["Patient"], 200);
        for t in ["Encounter", "Observation", "Condition", "MedicationRequest"] {
            assert!(
                by_type.get(t).copied().unwrap_or(0) > 20,
                "{t}: {by_type:?}"
            );
        }
        assert!(
            by_type["Observation"] > by_type["Encounter"] * 3,
            "{by_type:?}"
        );
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(END_DAY), "2026-01-01");
        assert_eq!(date(11_016), "2000-02-29");
    }
}
