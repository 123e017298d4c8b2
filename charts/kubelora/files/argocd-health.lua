-- Argo CD health check for kubelora.dev/LoRATrainingJob (tested in tests/test_gitops_health.py).
-- The operator writes status.phase, status.observedGeneration and the kstatus conditions
-- Ready / Reconciling / Stalled / Suspended (operator/kubelora_operator/status.py).
local hs = {}
local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the kubelora operator"
  return hs
end
if status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end

local message = status.message or status.phase
if status.progress ~= nil and status.progress.summary ~= nil and status.phase == "Training" then
  message = "step " .. status.progress.summary .. ": " .. message
end
local stalled = condition(status, "Stalled")
local ready = condition(status, "Ready")
local suspended = condition(status, "Suspended")
if status.phase == "Failed" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
elseif status.phase == "Succeeded" and (ready == nil or ready.status == "True") then
  hs.status = "Healthy"
elseif status.phase == "Suspended" or (suspended ~= nil and suspended.status == "True") then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
local label = status.phase
if status.reason ~= nil and status.reason ~= status.phase then
  label = label .. " (" .. status.reason .. ")"
end
hs.message = label .. ": " .. message
return hs
