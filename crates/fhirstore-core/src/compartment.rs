//! FHIR compartments (R4 §3.1.0.10): the official CompartmentDefinitions of Patient, Encounter,
//! RelatedPerson, Practitioner and Device, embedded from `fhir-profiles/`.
//!
//! A resource is in `Patient/p1`'s compartment when one of the reference parameters the
//! definition lists for its type points at `Patient/p1`; the focal resource itself is in its own
//! compartment. Membership is therefore what the reference index already holds, written in the
//! same transaction as the resource: a store answers a compartment search from that index
//! (see [`CompartmentScope`]), with no table of its own to keep in step.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::{LogicalId, ResourceType};

const DEFINITIONS: [&str; 5] = [
    include_str!(
        "../../../fhir-profiles/hl7.fhir.r4.examples-4.0.1/CompartmentDefinition-patient.json"
    ),
    include_str!(
        "../../../fhir-profiles/hl7.fhir.r4.examples-4.0.1/CompartmentDefinition-encounter.json"
    ),
    include_str!(
        "../../../fhir-profiles/hl7.fhir.r4.examples-4.0.1/CompartmentDefinition-relatedPerson.json"
    ),
    include_str!(
        "../../../fhir-profiles/hl7.fhir.r4.examples-4.0.1/CompartmentDefinition-practitioner.json"
    ),
    include_str!(
        "../../../fhir-profiles/hl7.fhir.r4.examples-4.0.1/CompartmentDefinition-device.json"
    ),
];

/// One compartment type's definition: for each member type, the parameters that make a
/// resource of it a member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compartment {
    /// The compartment's type: `Patient`, `Encounter`, …
    pub owner: Option<ResourceType>,
    /// Member type → its reference parameters (never `{def}`: the focal resource is a member
    /// by identity, not by a parameter).
    pub members: BTreeMap<ResourceType, Vec<String>>,
}

impl Compartment {
    /// The parameters placing a resource of `rt` in the compartment; `None` when no resource
    /// of that type can be in it (the focal type has an empty list: only itself is in).
    pub fn params(&self, rt: ResourceType) -> Option<&[String]> {
        self.members.get(&rt).map(Vec::as_slice)
    }
}

/// The five official compartment definitions.
#[derive(Debug)]
pub struct Compartments(BTreeMap<ResourceType, Compartment>);

impl Compartments {
    /// The R4 definitions, parsed on first use.
    pub fn r4() -> &'static Compartments {
        static R4: OnceLock<Compartments> = OnceLock::new();
        R4.get_or_init(|| {
            let mut all = BTreeMap::new();
            for text in DEFINITIONS {
                // Embedded and checked by the tests: a definition that does not parse is a
                // build defect, and an empty compartment is the safe way to show it.
                let Ok(def) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                if let Some(c) = parse(&def) {
                    if let Some(owner) = c.owner {
                        all.insert(owner, c);
                    }
                }
            }
            Compartments(all)
        })
    }

    /// The compartment of this type, if R4 defines one.
    pub fn get(&self, owner: ResourceType) -> Option<&Compartment> {
        self.0.get(&owner)
    }

    /// The compartment types, in name order.
    pub fn types(&self) -> impl Iterator<Item = ResourceType> + '_ {
        self.0.keys().copied()
    }
}

fn parse(def: &Value) -> Option<Compartment> {
    let owner = ResourceType::new(def.get("code")?.as_str()?).ok()?;
    let mut members = BTreeMap::new();
    for r in def.get("resource")?.as_array()? {
        let Some(rt) = r
            .get("code")
            .and_then(Value::as_str)
            .and_then(|c| ResourceType::new(c).ok())
        else {
            continue;
        };
        let params: Vec<String> = r
            .get("param")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|p| *p != "{def}")
            .map(str::to_owned)
            .collect();
        if !params.is_empty() || rt == owner {
            members.insert(rt, params);
        }
    }
    Some(Compartment {
        owner: Some(owner),
        members,
    })
}

/// A search restricted to one compartment (`GET Patient/p1/Observation`, `Patient/p1/*`,
/// `$everything`), or to every compartment of a type (`Patient/$export`): a resource matches
/// when it is the focal resource itself, or one of its type's compartment parameters points
/// at the focal resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompartmentScope {
    /// The compartment's type.
    pub owner_type: ResourceType,
    /// The focal resource; `None`: any resource of `owner_type` (every such compartment).
    pub owner_id: Option<LogicalId>,
    /// Member types and their parameters, in type order: the whole compartment, or only the
    /// types searched.
    pub members: Vec<(ResourceType, Vec<String>)>,
}

impl CompartmentScope {
    /// The scope of `owner_type`'s compartment (of `owner_id`, or of every one), over
    /// `types` (every member type when `None`). A type that cannot be in the compartment is
    /// an error naming it.
    pub fn new(
        owner_type: ResourceType,
        owner_id: Option<LogicalId>,
        types: Option<&[ResourceType]>,
    ) -> Result<Self> {
        let c = Compartments::r4().get(owner_type).ok_or_else(|| {
            Error::InvalidSearch(format!("{owner_type} has no compartment in R4"))
        })?;
        let members = match types {
            None => c.members.iter().map(|(t, p)| (*t, p.clone())).collect(),
            Some(types) => types
                .iter()
                .map(|t| {
                    c.params(*t).map(|p| (*t, p.to_vec())).ok_or_else(|| {
                        Error::InvalidSearch(format!(
                            "a {t} is never in a {owner_type} compartment"
                        ))
                    })
                })
                .collect::<Result<_>>()?,
        };
        Ok(CompartmentScope {
            owner_type,
            owner_id,
            members,
        })
    }

    /// The member types searched.
    pub fn types(&self) -> impl Iterator<Item = ResourceType> + '_ {
        self.members.iter().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(t: &str) -> ResourceType {
        ResourceType::new(t).expect("type")
    }

    #[test]
    fn the_five_definitions_load() {
        let all = Compartments::r4();
        let names: Vec<&str> = all.types().map(|t| t.as_str()).collect();
        assert_eq!(
            names,
            [
                "Device",
                "Encounter",
                "Patient",
                "Practitioner",
                "RelatedPerson"
            ]
        );
        let patient = all.get(rt("Patient")).expect("patient");
        assert_eq!(
            patient.params(rt("Observation")),
            Some(&["subject".to_owned(), "performer".to_owned()][..])
        );
        assert_eq!(
            patient.params(rt("Patient")),
            Some(&["link".to_owned()][..])
        );
        assert_eq!(patient.params(rt("Organization")), None);
        let encounter = all.get(rt("Encounter")).expect("encounter");
        assert_eq!(encounter.params(rt("Encounter")), Some(&[][..]));
        assert!(patient.members.len() > 60);
    }

    #[test]
    fn scopes_name_what_cannot_be_in_them() {
        let p1 = LogicalId::new("p1").ok();
        let s = CompartmentScope::new(rt("Patient"), p1.clone(), Some(&[rt("Observation")]))
            .expect("scope");
        assert_eq!(s.types().collect::<Vec<_>>(), [rt("Observation")]);
        let e = CompartmentScope::new(rt("Patient"), p1.clone(), Some(&[rt("Organization")]))
            .expect_err("not a member");
        assert!(e.to_string().contains("Organization"), "{e}");
        assert!(CompartmentScope::new(rt("Observation"), p1, None).is_err());
    }
}
