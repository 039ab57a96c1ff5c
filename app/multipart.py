"""A base for streaming multipart/form-data readers built on `python_multipart`'s parser."""

from python_multipart.multipart import parse_options_header


class PartReader:
    """Parser callbacks that collect each part's headers and hand on its name and data.

    Subclasses implement `start_part`, `part_data` and `end_part`; `callbacks()` is what
    `python_multipart.MultipartParser` takes.
    """

    def __init__(self) -> None:
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self.end_part,
        }

    def start_part(self, params: dict[bytes, bytes]) -> None:
        """Begin a part; `params` are its Content-Disposition parameters (`name`, `filename`)."""

    def part_data(self, data: bytes) -> None:
        """Take the next slice of the current part's body."""

    def end_part(self) -> None:
        """Finish the current part."""

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self.start_part(params)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part_data(data[start:end])
