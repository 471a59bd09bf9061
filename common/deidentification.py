"""Which DICOM attributes of the PS3.15 Basic Application Level Confidentiality Profile a
header still fills in (names only: no value is ever read out, logged or written).

The list is Table E.1-1 of DICOM PS3.15 (Annex E) by keyword, less two groups the check
cannot judge or the study needs:

- UIDs (Study/Series/SOP Instance UID, ...): the profile *replaces* them ("U"); a replaced
  UID looks like any other, so their presence says nothing.
- Patient characteristics (PatientSex, PatientAge, PatientSize, PatientWeight, ...): kept
  under the profile's "Retain Patient Characteristics Option", which a subgroup analysis by sex
  and age needs.

Private attributes are removed by the profile too; a header that has any is reported as
``private attributes``.

One exception follows the profile's own actions: PatientID is to be *replaced* by a dummy
(action Z), and a cohort needs that pseudonym to group images by patient. A header that
declares itself de-identified (PatientIdentityRemoved = YES, PS3.15 E.1.1) is taken at its
word for PatientID; every other filled-in attribute is still named.
"""

from __future__ import annotations

BASIC_PROFILE: tuple[str, ...] = tuple("""
AccessionNumber AcquisitionComments AcquisitionDate AcquisitionDateTime
AcquisitionDeviceProcessingDescription AcquisitionTime ActualHumanPerformersSequence
AdditionalPatientHistory AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence
AdmittingDiagnosesDescription AdmittingTime Allergies AuthorObserverSequence BranchOfService
CassetteID CommentsOnThePerformedProcedureStep ConfidentialityConstraintOnPatientDataDescription
ContentCreatorName ContentCreatorIdentificationCodeSequence ContentDate ContentTime
ContributionDescription CountryOfResidence CurrentPatientLocation CurveDate CurveTime
CustodialOrganizationSequence DerivationDescription DetectorID DeviceSerialNumber
DistributionAddress DistributionName EthnicGroup FrameComments GantryID GeneratorID
HumanPerformerName HumanPerformerOrganization IdentifyingComments ImageComments
ImagePresentationComments ImagingServiceRequestComments Impressions InstitutionAddress
InstitutionalDepartmentName InstitutionName InsurancePlanIdentification
IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationIDIssuer
InterpretationRecorder InterpretationText InterpretationTranscriber IssuerOfAdmissionID
IssuerOfPatientID IssuerOfServiceEpisodeID LastMenstrualDate MedicalAlerts
MedicalRecordLocator MilitaryRank ModifyingDeviceID ModifyingDeviceManufacturer
NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation
OperatorIdentificationSequence OperatorsName OrderCallbackPhoneNumber OrderEnteredBy
OrderEntererLocation OtherPatientIDs OtherPatientIDsSequence OtherPatientNames OverlayDate
OverlayTime ParticipantSequence PatientAddress PatientBirthDate PatientBirthName
PatientBirthTime PatientComments PatientID PatientInsurancePlanCodeSequence
PatientMotherBirthName PatientName PatientReligiousPreference PatientState
PatientTelephoneNumbers PatientTransportArrangements PerformedLocation
PerformedProcedureStepDescription PerformedProcedureStepID PerformedProcedureStepStartDate
PerformedProcedureStepStartTime PerformedStationAETitle PerformedStationName
PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress PersonName
PersonTelephoneNumbers PhysicianApprovingInterpretation
PhysiciansReadingStudyIdentificationSequence PhysiciansOfRecord
PhysiciansOfRecordIdentificationSequence PlateID PreMedication ProtocolName ReasonForStudy
ReasonForTheImagingServiceRequest ReferencedPatientAliasSequence ReferencedPatientSequence
ReferringPhysicianAddress ReferringPhysicianIdentificationSequence ReferringPhysicianName
ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence
RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID
RequestedProcedureLocation RequestingPhysician RequestingService ResponsibleOrganization
ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer ReviewerName
ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime ScheduledProcedureStepDescription
ScheduledProcedureStepLocation ScheduledProcedureStepStartDate ScheduledProcedureStepStartTime
ScheduledStationAETitle ScheduledStationName ScheduledStudyLocation
ScheduledStudyLocationAETitle SeriesDate SeriesDescription SeriesTime
ServiceEpisodeDescription ServiceEpisodeID SpecialNeeds StationName StudyComments StudyDate
StudyDescription StudyID StudyIDIssuer StudyTime TextComments TextString TopicAuthor
TopicKeywords TopicSubject TopicTitle VerifyingObserverIdentificationCodeSequence
VerifyingObserverName VerifyingObserverSequence VerifyingOrganization VisitComments
""".split())

PRIVATE = "private attributes"
_IN_PROFILE = frozenset(BASIC_PROFILE)
_ORDER = {keyword: k for k, keyword in enumerate(BASIC_PROFILE)}


def identifying_attributes(ds) -> list[str]:
    """The profile's attributes that ``ds`` (a pydicom Dataset, pixels not needed) fills in,
    in profile order, plus ``private attributes`` when it has any, plus
    ``BurnedInAnnotation=YES`` (text in the pixels, which no header edit removes)."""
    found: list[str] = []
    private = False
    try:
        declared = str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"
        for tag in list(ds.keys()):  # one pass, converting only the profile's elements
            if tag.is_private:
                private = True
                continue
            keyword = pydicom_keyword(tag)
            if keyword not in _IN_PROFILE or (declared and keyword == "PatientID"):
                continue
            if _filled_in(ds, tag):
                found.append(keyword)
        found.sort(key=_ORDER.__getitem__)
        if private:
            found.append(PRIVATE)
        if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
            found.append("BurnedInAnnotation=YES")
    except Exception:  # noqa: BLE001 - a header too broken to walk is reported elsewhere
        pass
    return found


def _filled_in(ds, tag) -> bool:
    """Whether an element holds a value, from its raw bytes where it is still raw (parsing
    every element of every header costs more than the rest of the check)."""
    raw = ds.get_item(tag)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes) and getattr(raw, "VR", None) != "SQ":
        return value.strip(b" \0") != b""
    try:
        value = ds[tag].value
    except Exception:  # noqa: BLE001 - an unparsable value is still a value
        return True
    return value is not None and str(value).strip() not in ("", "[]")


def pydicom_keyword(tag) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or ""
