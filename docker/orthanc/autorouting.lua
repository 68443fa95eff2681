-- Orthanc auto-routing for mammo-node: every stable study that holds mammograms (Modality MG) is
-- sent to the node, which C-STOREs its results (a Structured Report and a Secondary Capture
-- series) back into the same study.
--
-- Only MG series that the node did not produce are sent (the node's results are SR, PR and
-- Secondary Captures with Modality OT; the Manufacturer check, [output] manufacturer in the
-- node's config, also keeps out results of older versions whose SCs said MG). The number of MG instances routed is kept in the study's metadata, so the study
-- becoming stable again when the results arrive sends nothing; a study that receives new MG
-- images later is sent again (the node skips instances it already has and re-analyses).
--
-- Tomosynthesis series (Modality MG too) are left out: the node accepts them with the study but
-- never analyses them, so sending gigabytes of slices would only cost bandwidth. The node takes
-- everything else a mammography study holds (synthesized 2D, vendor Secondary Captures, dose
-- reports, presentation states, other CAD SRs) without failing the job, so a manual "send
-- study" of the whole study works as well.
--
-- Loaded by docker/orthanc/orthanc.json ("LuaScripts"); tests/test_docker_orthanc.py runs this
-- very file with Debian's Orthanc.

local NODE_MODALITY = 'mammo'          -- the key in "DicomModalities" (site.json)
local NODE_MANUFACTURER = 'mammo-node' -- [output] manufacturer of the node
local ROUTED = 'MammoRoutedInstances'  -- user metadata (orthanc.json "UserMetadata")
local TOMOSYNTHESIS = '1.2.840.10008.5.1.4.1.1.13.1.3'  -- Breast Tomosynthesis Image Storage

local function sopClassOf(seriesId)
  local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
  if #instances == 0 then
    return ''
  end
  return RestApiGet('/instances/' .. instances[1]['ID'] .. '/metadata/SopClassUid')
end

local function routedBefore(studyId)
  local names = ParseJson(RestApiGet('/studies/' .. studyId .. '/metadata'))
  for _, name in ipairs(names) do
    if name == ROUTED then
      return tonumber(RestApiGet('/studies/' .. studyId .. '/metadata/' .. ROUTED)) or 0
    end
  end
  return 0
end

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local resources = {}
  local instances = 0
  for _, s in ipairs(series) do
    local t = s['MainDicomTags']
    if t['Modality'] == 'MG' and t['Manufacturer'] ~= NODE_MANUFACTURER and
       sopClassOf(s['ID']) ~= TOMOSYNTHESIS then
      table.insert(resources, s['ID'])
      instances = instances + #s['Instances']
    end
  end
  if instances == 0 then
    return  -- not a mammography study
  end
  if instances <= routedBefore(studyId) then
    return  -- nothing new since the last routing (e.g. the node's results just arrived)
  end
  print('mammo-node: routing study ' .. studyId .. ' (' .. instances .. ' MG instances) to ' ..
        NODE_MODALITY)
  RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
              DumpJson({ Resources = resources, Asynchronous = true }, true))
  RestApiPut('/studies/' .. studyId .. '/metadata/' .. ROUTED, tostring(instances))
end
