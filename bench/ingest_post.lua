-- wrk script of bench/ingest_http.py: POST /v1/observations, one observation per request.
-- wrk ... -s ingest_post.lua URL -- TOKEN OUT_DIR RUN_ID
-- Each request gets a fresh deterministic event id (UUID shape: run id, thread, counter)
-- and its own subject; the response hook writes every 201's event id (or "E<status>")
-- to OUT_DIR/ids-<thread>.txt so the benchmark can check each one in the read model.

local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  token = args[1]
  out = io.open(args[2] .. "/ids-" .. tid .. ".txt", "w")
  out:setvbuf("line")
  run = args[3]
  counter = 0
  headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}
  values = {"calm", "frustrated", "angry", "relieved"}
end

function request()
  counter = counter + 1
  local id = string.format("%s-%04x-4000-8000-%012x", run, tid, counter)
  local body = string.format(
    '{"event_id":"%s","subject_id":"load-%s-%d-%d","context":"support",' ..
    '"attribute":"emotional_state","value":"%s","confidence":0.8,"source":"admin"}',
    id, run, tid, counter, values[counter % 4 + 1])
  return wrk.format("POST", "/v1/observations", headers, body)
end

function response(status, headers, body)
  if status == 201 then
    out:write(string.match(body, '"event_id":"([^"]+)"'), "\n")
  else
    out:write("E", status, "\n")
  end
end
