"""Tests for license normalisation and the license presets (diffusion.data.licenses)."""

import pytest

from diffusion.data.licenses import (
    ALL_LICENSES,
    LICENSE_PRESETS,
    allowed_licenses,
    license_allowed,
    license_url,
    normalize_license,
)

BY_3_URL = 'http://creativecommons.org/licenses/by/3.0/'
BY_SA_2_URL = 'https://creativecommons.org/licenses/by-sa/2.0/'
BY_NC_SA_2_URL = 'http://creativecommons.org/licenses/by-nc-sa/2.0/'

SPELLINGS = [
    # creativecommons.org URLs, with and without scheme, www, deed or legal-code suffix
    ('http://creativecommons.org/licenses/by-nc/2.0/', None, 'CC-BY-NC-2.0'),
    ('https://creativecommons.org/licenses/by-sa/4.0/deed.en', None, 'CC-BY-SA-4.0'),
    ('https://www.creativecommons.org/licenses/by-nc-nd/4.0/legalcode', None, 'CC-BY-NC-ND-4.0'),
    ('creativecommons.org/publicdomain/zero/1.0/', None, 'CC0-1.0'),
    ('https://creativecommons.org/publicdomain/mark/1.0/', None, 'PDM'),
    ('http://creativecommons.org/licenses/by-nd-nc/1.0/', None, 'CC-BY-NC-ND-1.0'),
    (None, 'https://creativecommons.org/licenses/by/2.5/deed.de', 'CC-BY-2.5'),
    # short names, any case and separator
    ('CC BY-SA 4.0', None, 'CC-BY-SA-4.0'),
    ('cc-by-nc-nd-3.0', None, 'CC-BY-NC-ND-3.0'),
    ('CC-BY 2.0', None, 'CC-BY-2.0'),
    ('cc_by_nc_sa_2.5', None, 'CC-BY-NC-SA-2.5'),
    ('  CC   BY   4  ', None, 'CC-BY-4.0'),
    ('Creative Commons Attribution-NonCommercial-NoDerivatives 4.0 International', None, 'CC-BY-NC-ND-4.0'),
    ('Attribution-Share Alike 3.0 Unported', None, 'CC-BY-SA-3.0'),
    # already canonical
    ('CC-BY-NC-SA-2.0', None, 'CC-BY-NC-SA-2.0'),
    ('CC0-1.0', None, 'CC0-1.0'),
    ('PDM', None, 'PDM'),
    # Flickr / YFCC100M / CommonCatalog names: 2.0 alone, the licenseurl's version when given
    ('Attribution License', None, 'CC-BY-2.0'),
    ('Attribution-NonCommercial License', None, 'CC-BY-NC-2.0'),
    ('Attribution-NonCommercial-NoDerivs License', None, 'CC-BY-NC-ND-2.0'),
    ('Attribution-NoDerivs License', None, 'CC-BY-ND-2.0'),
    ('Attribution-ShareAlike License', None, 'CC-BY-SA-2.0'),
    ('Attribution-NonCommercial-ShareAlike License', None, 'CC-BY-NC-SA-2.0'),
    ('attribution_noncommercial_sharealike license', BY_NC_SA_2_URL, 'CC-BY-NC-SA-2.0'),
    ('Attribution License', BY_3_URL, 'CC-BY-3.0'),
    ('Attribution-ShareAlike License', BY_SA_2_URL, 'CC-BY-SA-2.0'),
    # CC0 and public-domain-mark variants
    ('CC0', None, 'CC0-1.0'),
    ('cc0 1.0 universal', None, 'CC0-1.0'),
    ('Public Domain Dedication (CC0)', None, 'CC0-1.0'),
    ('Public Domain Mark', None, 'PDM'),
    ('public domain mark 1.0', None, 'PDM'),
    # Flickr numeric license ids, as int and as digit string
    (1, None, 'CC-BY-NC-SA-2.0'),
    (2, None, 'CC-BY-NC-2.0'),
    (3, None, 'CC-BY-NC-ND-2.0'),
    (4, None, 'CC-BY-2.0'),
    (5, None, 'CC-BY-SA-2.0'),
    (6, None, 'CC-BY-ND-2.0'),
    (9, None, 'CC0-1.0'),
    (10, None, 'PDM'),
    ('4', None, 'CC-BY-2.0'),
    (' 10 ', None, 'PDM'),
    (0, None, None),  # All Rights Reserved
    (7, None, None),  # No known copyright restrictions
    (8, None, None),  # United States Government Work
    ('0', None, None),
    (11, None, None),
    (True, None, None),
    # name and URL that disagree: ambiguous
    ('Attribution License', BY_SA_2_URL, None),
    ('CC BY-NC 2.0', 'https://creativecommons.org/licenses/by/2.0/', None),
    ('CC BY 4.0', BY_3_URL, None),  # same family, different version
    (5, BY_3_URL, None),
    ('Attribution License', 'https://example.com/license', None),
    # no version to be had, or not a license we list
    ('CC BY', None, None),
    ('Attribution', None, None),
    ('CC BY 5.0', None, None),
    ('CC BY-SA 3.0 US', None, None),
    ('https://creativecommons.org/licenses/by/2.0/de/', None, None),
    ('https://creativecommons.org/licenses/by-sa-nd/2.0/', None, None),
    ('CC BY-SA-ND 4.0', None, None),
    ('CC0 2.0', None, None),
    ('Public Domain', None, None),
    # garbage
    ('All Rights Reserved', None, None),
    ('', None, None),
    ('   ', None, None),
    (None, None, None),
    (None, '', None),
    ('lorem ipsum', None, None),
    ('by by 2.0', None, None),
    (4.0, None, None),
]


@pytest.mark.parametrize('value, url, expected', SPELLINGS)
def test_normalize_license(value, url, expected):
    assert normalize_license(value, url) == expected


def test_canonical_ids_and_their_urls_round_trip():
    assert len(ALL_LICENSES) == len(set(ALL_LICENSES)) == 2 + 6 * 5
    for license_id in ALL_LICENSES:
        assert normalize_license(license_id) == license_id
        assert normalize_license(license_id.lower().replace('-', ' ')) == license_id
        url = license_url(license_id)
        assert url.startswith('https://creativecommons.org/') and url.endswith('/')
        assert normalize_license(url) == license_id
        assert normalize_license(None, url) == license_id


def test_license_url_rejects_unknown_ids():
    with pytest.raises(ValueError, match='CC-BY-9.0'):
        license_url('CC-BY-9.0')


def test_commercial_preset_has_no_nc_or_nd_terms():
    commercial = allowed_licenses('commercial')
    assert not [lid for lid in commercial if '-NC' in lid or '-ND' in lid]
    assert {'CC0-1.0', 'PDM', 'CC-BY-SA-4.0', 'CC-BY-2.0', 'CC-BY-1.0'} <= commercial
    assert len(commercial) == 2 + 2 * 5
    for license_id in ALL_LICENSES:
        if '-NC' in license_id or '-ND' in license_id:
            assert not license_allowed(license_id, 'commercial')


def test_noncommercial_preset_allows_nc_but_not_nd():
    noncommercial = allowed_licenses('noncommercial')
    assert 'CC-BY-NC-SA-2.0' in noncommercial and 'CC-BY-NC-4.0' in noncommercial
    assert 'CC-BY-NC-ND-2.0' not in noncommercial and 'CC-BY-ND-4.0' not in noncommercial
    assert allowed_licenses('commercial') < noncommercial
    assert not [lid for lid in noncommercial if '-ND' in lid]
    assert len(noncommercial) == 2 + 4 * 5


def test_all_preset_is_every_canonical_id():
    assert allowed_licenses('all') == frozenset(ALL_LICENSES) == LICENSE_PRESETS['all']
    assert license_allowed('CC-BY-NC-ND-3.0', 'all')


def test_license_allowed_normalises_and_rejects_unknown():
    assert license_allowed('CC BY-SA 4.0', 'commercial')
    assert license_allowed('https://creativecommons.org/licenses/by-nc/2.0/', 'noncommercial')
    assert not license_allowed('https://creativecommons.org/licenses/by-nc/2.0/', 'commercial')
    assert not license_allowed(None, 'all')
    assert not license_allowed('All Rights Reserved', 'all')


def test_bad_preset_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        allowed_licenses('comercial')
    message = str(info.value)
    assert "'comercial'" in message
    for preset in ('commercial', 'noncommercial', 'all'):
        assert preset in message
    with pytest.raises(ValueError, match='bogus'):
        license_allowed('CC-BY-2.0', 'bogus')
