"""Normalise Creative-Commons license spellings to canonical identifiers, and filter them by use.

CommonCanvas is trained only on Creative-Commons images, so every record that enters a shard must carry a license we
can name exactly: the filter presets (commercial / noncommercial) and the attribution manifests both depend on it.
Sources spell licenses in many ways (creativecommons.org URLs, SPDX-like ids, Flickr's numeric ids, and the
``licensename`` / ``licenseurl`` columns of YFCC100M and CommonCatalog), so this module maps them all onto one set
of ids. It never guesses: anything ambiguous, unrecognised or contradictory comes back as ``None`` and the record is
dropped upstream. Pure standard library (``re``). In :mod:`diffusion.data` because both the pipeline's filter stage
and the training datasets (which refuse shards whose licenses a preset excludes) use it.
"""

from __future__ import annotations

import re

__all__ = [
    'ALL_LICENSES',
    'FLICKR_LICENSE_IDS',
    'LICENSE_PRESETS',
    'allowed_licenses',
    'license_allowed',
    'license_url',
    'normalize_license',
]

# Families in canonical spelling, each a set of license elements; every CC family but CC0/PDM requires attribution.
_FAMILIES: dict[frozenset[str], str] = {
    frozenset({'BY'}): 'BY',
    frozenset({'BY', 'SA'}): 'BY-SA',
    frozenset({'BY', 'NC'}): 'BY-NC',
    frozenset({'BY', 'NC', 'SA'}): 'BY-NC-SA',
    frozenset({'BY', 'ND'}): 'BY-ND',
    frozenset({'BY', 'NC', 'ND'}): 'BY-NC-ND',
}
_VERSIONS = ('1.0', '2.0', '2.5', '3.0', '4.0')
_CC0, _PDM = 'CC0', 'PDM'

ALL_LICENSES: tuple[str, ...] = ('CC0-1.0', 'PDM') + tuple(
    f'CC-{family}-{version}' for family in _FAMILIES.values() for version in _VERSIONS
)

# Flickr API license ids. 0 (All Rights Reserved), 7 (No known copyright restrictions) and 8 (United States
# Government Work) are deliberately absent: none of them is a CC license whose terms we could verify.
FLICKR_LICENSE_IDS: dict[int, str] = {
    1: 'CC-BY-NC-SA-2.0',
    2: 'CC-BY-NC-2.0',
    3: 'CC-BY-NC-ND-2.0',
    4: 'CC-BY-2.0',
    5: 'CC-BY-SA-2.0',
    6: 'CC-BY-ND-2.0',
    9: 'CC0-1.0',
    10: 'PDM',
}

# Words that name a license element, after separators are removed and multi-word forms are joined (see _tokens).
_ELEMENT_WORDS = {
    'by': 'BY',
    'attribution': 'BY',
    'sa': 'SA',
    'sharealike': 'SA',
    'nc': 'NC',
    'noncommercial': 'NC',
    'nd': 'ND',
    'noderivs': 'ND',
    'noderivatives': 'ND',
}
# Words that add nothing to the identity of a license. Anything else (e.g. a jurisdiction such as 'us') makes the
# spelling unrecognised, because ported licenses are distinct licenses that we do not list.
_FILLER_WORDS = {'cc', 'creative', 'commons', 'license', 'licence', 'generic', 'unported', 'international'}
_CC0_WORDS = _FILLER_WORDS | {'cc0', 'zero', 'public', 'domain', 'dedication', 'universal'}
_PDM_WORDS = _FILLER_WORDS | {'pdm', 'public', 'domain', 'mark'}
_JOINS = (
    (re.compile(r'\bnon commercial\b'), 'noncommercial'),
    (re.compile(r'\bshare alike\b'), 'sharealike'),
    (re.compile(r'\bno deriv(s|atives)\b'), r'noderiv\1'),
)
_VERSION_RE = re.compile(r'^(\d)(?:\.(\d))?$')

# Flickr's (and so YFCC100M's / CommonCatalog's ``licensename``) names carry no version. Flickr only ever offered the
# CC 2.0 generic licenses, so these exact names, and only these, default to 2.0 when no license URL says otherwise.
_FLICKR_NAMES = {
    'attribution license': 'BY',
    'attribution sharealike license': 'BY-SA',
    'attribution noncommercial license': 'BY-NC',
    'attribution noncommercial sharealike license': 'BY-NC-SA',
    'attribution noderivs license': 'BY-ND',
    'attribution noncommercial noderivs license': 'BY-NC-ND',
}

_URL_RE = re.compile(
    r'^(?:https?://)?(?:www\.)?creativecommons\.org/'
    r'(?:licenses/(?P<code>[a-z]+(?:-[a-z]+)*)|publicdomain/(?P<pd>zero|mark))/(?P<version>\d\.\d)'
    # Only the generic license: deed and legal-code pages are fine, a jurisdiction segment (a port) is not.
    r'/?(?:(?:deed|legalcode)(?:\.[a-z_-]+)?/?|rdf/?)?$'
)

# A parsed spelling: (family, explicit version or None, version to assume when nothing explicit is known).
_Parsed = tuple[str, str | None, str | None]


def _tokens(text: str) -> list[str]:
    """Lower-case words of ``text``, with separators dropped and multi-word element names joined."""
    joined = ' '.join(re.sub(r'[^a-z0-9.]+', ' ', text.lower()).split())
    for pattern, replacement in _JOINS:
        joined = pattern.sub(replacement, joined)
    return joined.split()


def _version(token: str) -> str | None:
    """'4' or '4.0' -> '4.0'; None unless it is a CC license version."""
    match = _VERSION_RE.match(token)
    if match is None:
        return None
    version = f'{match.group(1)}.{match.group(2) or 0}'
    return version if version in _VERSIONS else None


def _parse_url(url: str) -> _Parsed | None:
    match = _URL_RE.match(url.strip().lower().split('?')[0].split('#')[0])
    if match is None:
        return None
    version = match.group('version')
    if match.group('pd'):
        # Both public-domain tools exist only as 1.0; the canonical ids carry no other version.
        return (_CC0 if match.group('pd') == 'zero' else _PDM, None, '1.0') if version == '1.0' else None
    if version not in _VERSIONS:
        return None
    elements = match.group('code').split('-')
    family = _FAMILIES.get(frozenset(e.upper() for e in elements))
    if family is None or len(set(elements)) != len(elements):
        return None
    return family, version, None


def _parse_name(name: str) -> _Parsed | None:
    words = _tokens(name)
    if not words:
        return None
    flickr_family = _FLICKR_NAMES.get(' '.join(words))
    if flickr_family is not None:
        return flickr_family, None, '2.0'
    # Canonical ids such as 'CC0-1.0' arrive here tokenised as ['cc0', '1.0'], so they need no special case.
    versions = [v for v in map(_version, words) if v is not None]
    rest = [w for w in words if _version(w) is None]  # a number that is no CC version stays, and fails below
    if len(versions) > 1:
        return None
    version = versions[0] if versions else None
    public = set(rest)
    if 'cc0' in public or 'zero' in public or 'dedication' in public:
        ok = public <= _CC0_WORDS and not public & {'by', 'attribution', 'mark'}
        return (_CC0, None, '1.0') if ok and version in (None, '1.0') else None
    if 'pdm' in public or {'public', 'domain', 'mark'} <= public:
        return (_PDM, None, '1.0') if public <= _PDM_WORDS and version in (None, '1.0') else None
    elements = [_ELEMENT_WORDS.get(w) for w in rest if w not in _FILLER_WORDS]
    if not elements or None in elements or len(set(elements)) != len(elements):
        return None  # plain 'Public Domain', unknown words, or a repeated element
    family = _FAMILIES.get(frozenset(elements))
    return (family, version, None) if family is not None else None


def _parse_value(value: object) -> _Parsed | None:
    if isinstance(value, bool):
        return None  # bool is an int subclass, but True is not Flickr license 1
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        license_id = FLICKR_LICENSE_IDS.get(int(value))
        if license_id is None:
            return None
        if license_id == 'PDM':
            return _PDM, '1.0', None
        family, version = license_id.removeprefix('CC-').rsplit('-', 1)
        return (_CC0 if family == 'CC0' else family), version, None
    if not isinstance(value, str):
        return None
    if 'creativecommons.org' in value.lower():
        return _parse_url(value)
    return _parse_name(value)


def normalize_license(value: str | int | None, url: str | None = None) -> str | None:
    """Map a license spelling, and optionally its URL, to a canonical id, or None when that is not certain.

    Accepted spellings include creativecommons.org URLs (with or without ``deed.xx`` / ``legalcode``), names such as
    ``'CC BY-SA 4.0'``, ``'cc-by-nc-nd-3.0'``, ``'Public Domain Dedication (CC0)'``, Flickr's names such as
    ``'Attribution-NonCommercial License'`` (version 2.0 unless ``url`` says otherwise), Flickr numeric license ids
    as int or digit string, and the canonical ids themselves. Matching ignores case, whitespace, hyphens and
    underscores.

    Args:
        value (str | int | None): The license as found (name, id, or URL); None or empty when only ``url`` is known.
        url (str | None): The license URL that came with ``value`` (e.g. YFCC100M's ``licenseurl`` column).

    Returns:
        str | None: One of :data:`ALL_LICENSES`, or None when a given spelling is unrecognised, when name and URL
        disagree (family or version), or when no version can be established.
    """
    parsed = []
    if value is not None and not (isinstance(value, str) and not value.strip()):
        parsed.append(_parse_value(value))
    if url is not None and not (isinstance(url, str) and not url.strip()):
        parsed.append(_parse_url(url) if isinstance(url, str) else None)
    if not parsed or any(p is None for p in parsed):
        return None  # every given spelling must be understood: an unknown one may be the truth
    families = {family for family, _, _ in parsed}
    explicit = {version for _, version, _ in parsed if version is not None}
    if len(families) != 1 or len(explicit) > 1:
        return None
    family = families.pop()
    version = explicit.pop() if explicit else next((d for _, _, d in parsed if d is not None), None)
    if version is None:
        return None
    if family == _CC0:
        return 'CC0-1.0'
    if family == _PDM:
        return 'PDM'
    return f'CC-{family}-{version}'


_COMMERCIAL = frozenset(
    lid for lid in ALL_LICENSES if lid in ('CC0-1.0', 'PDM') or lid.rsplit('-', 1)[0] in ('CC-BY', 'CC-BY-SA')
)
_NONCOMMERCIAL = _COMMERCIAL | frozenset(
    lid for lid in ALL_LICENSES if lid.rsplit('-', 1)[0] in ('CC-BY-NC', 'CC-BY-NC-SA')
)

# Which licenses each preset keeps. 'commercial' forbids NonCommercial and NoDerivatives terms (a trained model may
# be a derivative); 'noncommercial' allows NC but still forbids ND; 'all' keeps any license we can name.
LICENSE_PRESETS: dict[str, frozenset[str]] = {
    'commercial': _COMMERCIAL,
    'noncommercial': _NONCOMMERCIAL,
    'all': frozenset(ALL_LICENSES),
}


def allowed_licenses(preset: str) -> frozenset[str]:
    """The canonical license ids a preset keeps.

    Args:
        preset (str): One of ``'commercial'``, ``'noncommercial'``, ``'all'``.

    Raises:
        ValueError: If ``preset`` is not a known preset.
    """
    try:
        return LICENSE_PRESETS[preset]
    except (KeyError, TypeError):
        valid = ', '.join(repr(name) for name in LICENSE_PRESETS)
        raise ValueError(f'Unknown license preset {preset!r}; valid presets are {valid}.') from None


def license_allowed(license_id: str | None, preset: str) -> bool:
    """Whether a license passes a preset; non-canonical spellings are normalised first, unknown ones never pass."""
    if license_id is not None and license_id not in ALL_LICENSES:
        license_id = normalize_license(license_id)
    allowed = allowed_licenses(preset)
    return license_id is not None and license_id in allowed


def license_url(license_id: str) -> str:
    """The canonical creativecommons.org URL of a canonical license id, for attribution manifests.

    Raises:
        ValueError: If ``license_id`` is not one of :data:`ALL_LICENSES`.
    """
    if license_id not in ALL_LICENSES:
        raise ValueError(f'Unknown license id {license_id!r}; expected a canonical id such as CC-BY-4.0.')
    if license_id == 'CC0-1.0':
        return 'https://creativecommons.org/publicdomain/zero/1.0/'
    if license_id == 'PDM':
        return 'https://creativecommons.org/publicdomain/mark/1.0/'
    family, version = license_id.removeprefix('CC-').rsplit('-', 1)
    code = family.lower()
    if code == 'by-nc-nd' and version == '1.0':
        code = 'by-nd-nc'  # the 1.0 license was published under this element order
    return f'https://creativecommons.org/licenses/{code}/{version}/'
