-- An Event's records keep the time of the occurrence they report, as the kubernetes_events
-- input gives it: series.lastObservedTime, else lastTimestamp, else eventTime, else
-- firstTimestamp, else metadata.creationTimestamp (RFC 3339, UTC).

local function days_from_civil(y, m, d)
  -- Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date.
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function parse(text)
  if type(text) ~= "string" then return nil end
  local y, mo, d, h, mi, s, frac = text:match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)%.?(%d*)Z$")
  if not y then return nil end
  local seconds = days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
  local nsec = 0
  if frac ~= "" then nsec = tonumber((frac .. "000000000"):sub(1, 9)) end
  return {sec = seconds, nsec = nsec}
end

function event_time(tag, timestamp, record)
  local series = record["series"] or {}
  local meta = record["metadata"] or {}
  local when = parse(series["lastObservedTime"]) or parse(record["lastTimestamp"])
    or parse(record["eventTime"]) or parse(record["firstTimestamp"]) or parse(meta["creationTimestamp"])
  if when == nil then return 0, timestamp, record end
  return 1, when, record
end
