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


def identifying_attributes(ds) -> list[str]:
    """The profile's attributes that ``ds`` (a pydicom Dataset, pixels not needed) fills in,
    in profile order, plus ``private attributes`` when it has any, plus
    ``BurnedInAnnotation=YES`` (text in the pixels, which no header edit removes)."""
    found = []
    for keyword in BASIC_PROFILE:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - an unparsable value is still a value
            found.append(keyword)
            continue
        if value is not None and str(value).strip() not in ("", "[]"):
            found.append(keyword)
    try:
        if any(elem.tag.is_private for elem in ds):
            found.append(PRIVATE)
        if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
            found.append("BurnedInAnnotation=YES")
    except Exception:  # noqa: BLE001 - a header too broken to walk is reported elsewhere
        pass
    return found
