"""history_weather('City, YYYY-MM-DD'): a cache backend (TARA's weather_history.json) and an HTTP backend."""
from __future__ import annotations

import re
from pathlib import Path

from align.tools.base import Tool, ToolError
from align.tools.data import load_json, optional_tara_dir
from align.tools.http_client import HTTPConfig, request_json

_QUERY = re.compile(r"\s*(.+?)\s*,\s*(\d{4}-\d{2}-\d{2})\s*")


def parse_query(text: str) -> tuple[str, str]:
    m = _QUERY.fullmatch(text.strip().strip("'\""))
    if not m:
        raise ToolError(f"expected 'City, YYYY-MM-DD', got {text.strip()[:60]!r}")
    return m.group(1), m.group(2)


def format_weather(city: str, day: str, d: dict) -> str:
    """Themis's observation text from a weatherapi.com `forecastday[0].day` record."""
    return (f"The weather for {city} on {day} is: \n"
            f"overall weather: {d['condition']['text']}; temperature: {d['avgtemp_c']}(C); "
            f"wind speed: {d['maxwind_kph']}(kph), {d['maxwind_mph']}(mph); "
            f"precipitation: {d['totalprecip_mm']}(mm), {d['totalprecip_in']}(inch); "
            f"visibility: {d['avgvis_km']}(km), {d['avgvis_miles']}(miles); "
            f"humidity: {d['avghumidity']}; UV index: {d['uv']}.")


class HistoryWeather(Tool):
    """cache: a dict or JSON file {"City, YYYY-MM-DD": observation}; "tara" (default) uses TARA's cache when
    present. http: weatherapi.com-compatible history endpoint (URL/key from config or $ALIGN_WEATHER_URL /
    $ALIGN_WEATHER_API_KEY), tried on a cache miss when a key is set."""

    name = "history_weather"
    description = "Historical weather of a city on a date: 'City, YYYY-MM-DD'."

    def __init__(self, cache: dict | str | Path | None = "tara", http: HTTPConfig | None = None):
        self.cache = cache
        self.http = http or HTTPConfig(url="http://api.weatherapi.com/v1/history.json",
                                       url_env="ALIGN_WEATHER_URL", key_env="ALIGN_WEATHER_API_KEY")

    def _cache(self) -> dict:
        if isinstance(self.cache, dict):
            return self.cache
        if self.cache == "tara":
            root = optional_tara_dir()
            return load_json(root / "weather_history.json") if root and (root / "weather_history.json").exists() else {}
        if self.cache:
            return load_json(self.cache)
        return {}

    def run(self, input: str, context: dict) -> str:
        city, day = parse_query(input)
        cache = self._cache()
        for key in (f"{city}, {day}", input.strip()):
            if key in cache:
                return cache[key]
        key = self.http.resolved_key()
        if not key:
            raise ToolError(f"no cached weather for '{city}, {day}' and no API key; set ALIGN_WEATHER_API_KEY")
        data = request_json(self.http, "GET", params={"key": key, "q": city, "dt": day, "hour": 12})
        try:
            return format_weather(city, day, data["forecast"]["forecastday"][0]["day"])
        except (KeyError, IndexError, TypeError):
            raise ToolError(f"weather backend returned no record for '{city}, {day}'") from None


__all__ = ["HistoryWeather", "format_weather", "parse_query"]
