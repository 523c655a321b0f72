-- Adds a level from the log text, as many clusters' Lua filters do.
function add_level(tag, timestamp, record)
    local log = record["log"]
    if log == nil then
        return 0, timestamp, record
    end
    if string.find(log, "ERROR") then
        record["level"] = "error"
    elseif string.find(log, "WARN") then
        record["level"] = "warning"
    else
        record["level"] = "info"
    end
    return 1, timestamp, record
end
