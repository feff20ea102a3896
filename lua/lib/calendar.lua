-- lib/calendar.lua: the budget period [start, end) in ms that an instant falls in: a UTC day,
-- a week from Monday, a month from the 1st (the boundaries of `src/period.rs`).
--
-- Why a file of its own: admit.lua (when does the period turn) and settle.lua (which period
-- does this spend belong to) must agree to the millisecond, and scripts called by EVALSHA
-- cannot share code, so tollgate prepends this file to both (`src/hot/scripts/`). It costs a
-- script one closure per call; the calendar arithmetic runs only for keys with a periodic
-- budget.

local function period_bounds(kind, t)
  local DAY = 86400000
  local function days_from_civil(y, m, d)
    if m <= 2 then y = y - 1 end
    local era = math.floor(y / 400)
    local yoe = y - era * 400
    local mp = m > 2 and m - 3 or m + 9
    local doy = math.floor((153 * mp + 2) / 5) + d - 1
    local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
  end
  local day = math.floor(t / DAY)
  if kind == 'day' then return day * DAY, (day + 1) * DAY end
  if kind == 'week' then
    local first = day - (day + 3) % 7
    return first * DAY, (first + 7) * DAY
  end
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * DAY, days_from_civil(ny, nm, 1) * DAY
end
