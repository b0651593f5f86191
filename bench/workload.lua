-- wrk workload for the Todo API benchmark (run by bench/run.py).
--
--   wrk -t1 -c32 -d30s -s bench/workload.lua http://127.0.0.1:PORT -- DATA.lua
--
-- DATA.lua returns a list of users: { {id = "...", token = "...", tasks = {1, 2, ...}}, ... }
-- (written by run.py after seeding). Every request picks a random user and:
--   30% list    GET    /api/{u}/tasks?limit=50
--   10% tagged  GET    /api/{u}/tasks?limit=50&tag={one of TAGS}
--   20% get     GET    /api/{u}/tasks/{seeded id}
--   15% create  POST   /api/{u}/tasks   (two distinct tags of TAGS)
--   15% toggle  PATCH  /api/{u}/tasks/{seeded id}/complete
--    5% update  PUT    /api/{u}/tasks/{seeded id}   (new title)
--    5% delete  DELETE /api/{u}/tasks/{id created earlier by this thread}   (to the trash)
-- Seeded tasks are never deleted; a delete pops an id from this thread's pool of tasks it
-- created (read from the 201 bodies in response()), so no request is expected to fail. While
-- the pool is empty (the first few requests) a delete is sent as a create instead.
-- TAGS must be run.py's TAGS (the seeded tasks carry the same vocabulary).
-- done() prints one line "BENCH_RESULT {json}" with latency, counts and failure samples.

local MIX = {
  {"list", 30}, {"tagged", 10}, {"get", 20}, {"create", 15}, {"toggle", 15}, {"update", 5}, {"delete", 5},
}
local TAGS = {"work", "home", "errands", "health", "finance", "family", "study", "travel"}
local SLOTS = {}  -- 100 entries, one op name each, so math.random(100) draws the mix
for _, entry in ipairs(MIX) do
  for _ = 1, entry[2] do SLOTS[#SLOTS + 1] = entry[1] end
end
local MAX_SAMPLES = 5

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
  thread:set("thread_id", #threads)
end

function init(args)
  users = dofile(args[1])
  user_index = {}
  for i, u in ipairs(users) do
    user_index[u.id] = i
    u.base = "/api/" .. u.id .. "/tasks"
    u.auth = { ["Authorization"] = "Bearer " .. u.token }
    u.json = { ["Authorization"] = "Bearer " .. u.token, ["Content-Type"] = "application/json" }
  end
  deletable = {}          -- stack of {user index, task id} created by this thread
  sent = {}               -- op name -> requests sent
  for _, entry in ipairs(MIX) do sent[entry[1]] = 0 end
  statuses = {}           -- status code (as string) -> responses
  failures = 0            -- responses with status >= 300
  samples = {}            -- first MAX_SAMPLES failing responses: "status body"
  unparsed_creates = 0    -- 201 responses whose id/user_id could not be read
  delete_fallbacks = 0    -- deletes sent as creates because the pool was empty
  counter = 0
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

local function random_task(u)
  return u.base .. "/" .. u.tasks[math.random(#u.tasks)]
end

-- Two distinct tags of TAGS, as a JSON array.
local function two_tags()
  local a, b = math.random(#TAGS), math.random(#TAGS - 1)
  if b >= a then b = b + 1 end
  return '["' .. TAGS[a] .. '","' .. TAGS[b] .. '"]'
end

function request()
  local op = SLOTS[math.random(100)]
  local u = users[math.random(#users)]
  if op == "delete" then
    local n = #deletable
    if n > 0 then
      local item = deletable[n]
      deletable[n] = nil
      sent.delete = sent.delete + 1
      return wrk.format("DELETE", users[item[1]].base .. "/" .. item[2], users[item[1]].auth)
    end
    delete_fallbacks = delete_fallbacks + 1
    op = "create"
  end
  sent[op] = sent[op] + 1
  counter = counter + 1
  if op == "list" then
    return wrk.format("GET", u.base .. "?limit=50", u.auth)
  elseif op == "tagged" then
    return wrk.format("GET", u.base .. "?limit=50&tag=" .. TAGS[math.random(#TAGS)], u.auth)
  elseif op == "get" then
    return wrk.format("GET", random_task(u), u.auth)
  elseif op == "create" then
    local body = '{"title":"wrk task ' .. counter .. '","description":"created under load","tags":' .. two_tags() .. '}'
    return wrk.format("POST", u.base, u.json, body)
  elseif op == "toggle" then
    return wrk.format("PATCH", random_task(u) .. "/complete", u.auth)
  else -- update
    local body = '{"title":"renamed ' .. counter .. '"}'
    return wrk.format("PUT", random_task(u), u.json, body)
  end
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status >= 300 then
    failures = failures + 1
    if #samples < MAX_SAMPLES then
      samples[#samples + 1] = key .. " " .. string.sub(body or "", 1, 300)
    end
  elseif status == 201 then
    local id = string.match(body, '"id"%s*:%s*(%d+)')
    local ui = user_index[string.match(body, '"user_id"%s*:%s*"([^"]*)"') or ""]
    if id and ui then
      deletable[#deletable + 1] = { ui, id }
    else
      unparsed_creates = unparsed_creates + 1
    end
  end
end

-- Minimal JSON encoder for the result line (numbers, strings, booleans, tables).
local function encode(value)
  local kind = type(value)
  if kind == "number" then
    return string.format("%.17g", value)
  elseif kind == "string" then
    local escaped = value:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end)
    return '"' .. escaped .. '"'
  elseif kind == "boolean" then
    return tostring(value)
  elseif kind == "table" then
    if #value > 0 or next(value) == nil then
      local parts = {}
      for _, v in ipairs(value) do parts[#parts + 1] = encode(v) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local parts = {}
    for k, v in pairs(value) do parts[#parts + 1] = encode(tostring(k)) .. ":" .. encode(v) end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return "null"
end

local function add_into(total, part)
  for k, v in pairs(part or {}) do total[k] = (total[k] or 0) + v end
end

function done(summary, latency, requests)
  local result = {
    duration_us = summary.duration,
    requests = summary.requests,
    bytes = summary.bytes,
    errors = summary.errors,
    latency_us = {
      min = latency.min, mean = latency.mean, max = latency.max, stdev = latency.stdev,
      p50 = latency:percentile(50), p90 = latency:percentile(90),
      p99 = latency:percentile(99), p999 = latency:percentile(99.9),
    },
    sent = {}, statuses = {}, failures = 0, samples = {},
    unparsed_creates = 0, delete_fallbacks = 0, threads = #threads,
  }
  for _, t in ipairs(threads) do
    add_into(result.sent, t:get("sent"))
    add_into(result.statuses, t:get("statuses"))
    result.failures = result.failures + (t:get("failures") or 0)
    result.unparsed_creates = result.unparsed_creates + (t:get("unparsed_creates") or 0)
    result.delete_fallbacks = result.delete_fallbacks + (t:get("delete_fallbacks") or 0)
    for _, s in ipairs(t:get("samples") or {}) do
      if #result.samples < MAX_SAMPLES then result.samples[#result.samples + 1] = s end
    end
  end
  io.write("BENCH_RESULT " .. encode(result) .. "\n")
end
