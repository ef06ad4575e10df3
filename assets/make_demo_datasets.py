"""Writes the demo datasets in assets/datasets/ (all text written for this project) from templates and a small
bank of questions, so that a few minutes of CPU LoRA training visibly changes how SmolLM2-135M answers.

    .venv/bin/python assets/make_demo_datasets.py        # rewrites the .jsonl and .card.yaml files

Each Alpaca dataset (pirate-persona, json-answers, helpdesk) teaches one consistent behaviour with short answers (about
20-60 tokens), because a small model picks up a uniform style from a few hundred short examples much faster than varied
long ones. Two small conversation datasets, stored in the `messages` shape of app/data/conversation.py, show whole
chats: support-chat (multi-turn, a system prompt each, later answers depending on earlier turns) and tool-calls
(assistant tool calls, tool results and the answer drawn from them; kept apart because SmolLM2's chat template cannot
write tool calls, which the data check reports for that file).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "datasets"

# --- the question bank shared by the pirate and JSON datasets ----------------------------------------------------
# (subject, plain answer, topic). "How-to" subjects are verb phrases; "what" subjects are noun phrases.
HOWTO = [
    ("sleep better", "Keep your room dark and cool, go to bed at the same time each night, and put screens away an hour before sleep.", "health"),
    ("boil an egg", "Put the egg in boiling water for about 7 minutes for a firm yolk, then cool it in cold water before peeling.", "cooking"),
    ("save money each month", "Write down what you spend for a month, set a budget, and move a fixed amount to savings on payday.", "money"),
    ("learn a new language", "Practise a little every day, learn the most common words first, and speak with native speakers as early as you can.", "language"),
    ("make a cup of tea", "Boil fresh water, pour it over the tea bag, steep for three to five minutes, then remove the bag and add milk if you like.", "cooking"),
    ("wake up earlier", "Move your alarm fifteen minutes earlier each week, get morning light, and go to bed a little earlier too.", "health"),
    ("keep houseplants alive", "Check the soil before watering, give them bright indirect light, and make sure the pot has drainage holes.", "nature"),
    ("write a good email", "Use a clear subject line, state your request in the first sentence, keep it short, and end with a polite thank you.", "work"),
    ("prepare for a job interview", "Research the company, practise answers to common questions out loud, and prepare two questions to ask them.", "work"),
    ("run my first 5 km", "Start with run-walk intervals three times a week, add a minute of running each session, and rest between runs.", "sport"),
    ("clean a cast iron pan", "Rinse it with hot water, scrub off food with a brush, dry it fully on the stove, and rub in a thin layer of oil.", "cooking"),
    ("remember people's names", "Repeat the name when you hear it, link it to something about the person, and use it once more before you say goodbye.", "people"),
    ("cook rice", "Rinse one cup of rice, add one and a half cups of water, simmer covered for 15 minutes, then rest it for 5 minutes.", "cooking"),
    ("reduce stress", "Take short walks, breathe slowly for a few minutes, sleep enough, and talk to someone you trust.", "health"),
    ("start a vegetable garden", "Pick a sunny spot, start with easy crops like lettuce, beans and radishes, and water the soil deeply twice a week.", "nature"),
    ("make a strong password", "Use a long phrase of four or more random words, never reuse it, and keep it in a password manager.", "technology"),
    ("speed up a slow computer", "Close programs you are not using, remove apps that start on boot, free up disk space, and install updates.", "technology"),
    ("give a good presentation", "Know your main message, use few words on each slide, practise out loud, and look at your audience.", "work"),
    ("drink more water", "Keep a bottle on your desk, drink a glass with every meal, and add lemon or mint if plain water bores you.", "health"),
    ("fold a shirt neatly", "Lay it face down, fold each side and sleeve to the middle, then fold the bottom up in half or thirds.", "home"),
    ("remove a coffee stain", "Blot it at once, rinse from the back with cold water, rub in a little dish soap, and wash it as usual.", "home"),
    ("teach a puppy to sit", "Hold a treat above its nose, move it back so the puppy sits, say 'sit', and reward it right away.", "animals"),
    ("make friends in a new city", "Join a club or class you enjoy, say yes to invitations, and meet the same people regularly.", "people"),
    ("read more books", "Carry a book everywhere, read ten pages before bed, and give up on books you do not enjoy.", "hobbies"),
    ("keep a household budget", "List your income, sort spending into needs and wants, give every expense a limit, and check it weekly.", "money"),
    ("bake bread at home", "Mix flour, water, yeast and salt, knead for ten minutes, let it rise until doubled, then bake at 220 °C for about 30 minutes.", "cooking"),
    ("learn to swim", "Take lessons in shallow water, practise floating and breathing first, and add kicking and strokes step by step.", "sport"),
    ("stop procrastinating", "Break the task into tiny steps, start with just five minutes, and put your phone in another room.", "work"),
    ("back up my photos", "Copy them to an external drive and to a cloud service, so you always have two copies in different places.", "technology"),
    ("keep my phone battery healthy", "Avoid letting it drop to zero, keep it out of heat, and charge it to about 80 percent when you can.", "technology"),
    ("improve my handwriting", "Write slowly, hold the pen loosely, and copy a few lines of neat letters every day.", "language"),
    ("plan a holiday", "Choose dates and a budget first, book travel and a place to stay, then list a few things you most want to see.", "travel"),
    ("pack light for a trip", "Bring clothes that mix and match, roll them instead of folding, and take only one extra pair of shoes.", "travel"),
    ("get rid of fruit flies", "Throw out overripe fruit, take out the rubbish, and set a small bowl of vinegar with a drop of soap as a trap.", "home"),
    ("look after a cat", "Give it fresh water, good food, a clean litter box, daily play and a yearly visit to the vet.", "animals"),
    ("sharpen a kitchen knife", "Hold the blade at about 20 degrees on a whetstone, draw it across evenly on both sides, then hone it.", "cooking"),
    ("warm up before exercise", "Spend five to ten minutes on light cardio, then do moving stretches like leg swings and arm circles.", "sport"),
    ("study for an exam", "Spread study over several days, test yourself instead of rereading, and sleep well the night before.", "learning"),
    ("write a short story", "Start with a character who wants something, put an obstacle in the way, and end with a change.", "language"),
    ("take better photos with my phone", "Clean the lens, use natural light, keep the horizon straight, and tap the screen to focus on your subject.", "technology"),
]
WHAT = [
    ("a volcano", "A volcano is an opening in the Earth's crust where melted rock, gas and ash escape from deep underground.", "science"),
    ("a black hole", "A black hole is a region in space where gravity is so strong that nothing, not even light, can escape.", "space"),
    ("an atom", "An atom is the smallest unit of a chemical element: a nucleus of protons and neutrons with electrons around it.", "science"),
    ("inflation", "Inflation is the general rise in prices over time, so the same money buys a little less each year.", "money"),
    ("an allergy", "An allergy is when the immune system treats something harmless, like pollen or peanuts, as a threat.", "health"),
    ("a glacier", "A glacier is a huge, slow-moving river of ice formed from snow that builds up over many years.", "nature"),
    ("the internet", "The internet is a worldwide network of computers that share information using common rules called protocols.", "technology"),
    ("a haiku", "A haiku is a short Japanese poem of three lines with five, seven and five syllables.", "language"),
    ("gravity", "Gravity is the force that pulls objects with mass toward each other; it keeps us on the ground and the Moon in orbit.", "science"),
    ("a vaccine", "A vaccine trains the immune system to recognise a germ, so the body can fight it off quickly later.", "health"),
    ("an earthquake", "An earthquake is a sudden shaking of the ground caused by rocks slipping along a fault deep underground.", "science"),
    ("compound interest", "Compound interest means you earn interest on your savings and also on the interest already added.", "money"),
    ("a comet", "A comet is a ball of ice, dust and rock that grows a glowing tail when its orbit brings it near the Sun.", "space"),
    ("a rainforest", "A rainforest is a dense forest with heavy rain all year, home to more kinds of plants and animals than anywhere else.", "nature"),
    ("a password manager", "A password manager is an app that stores your passwords safely and fills them in, so each site can have its own.", "technology"),
    ("a metaphor", "A metaphor describes something by calling it something else, like saying 'time is a thief'.", "language"),
    ("the water cycle", "The water cycle is how water evaporates, forms clouds, falls as rain or snow, and flows back to the sea.", "science"),
    ("a calorie", "A calorie is a unit of energy; on food labels it tells you how much energy the food gives your body.", "health"),
    ("cloud storage", "Cloud storage keeps your files on a company's servers, so you can reach them from any device online.", "technology"),
    ("a tide", "A tide is the regular rise and fall of the sea, caused mostly by the Moon's gravity pulling on the oceans.", "nature"),
    ("democracy", "Democracy is a system of government where citizens choose their leaders and laws by voting.", "society"),
    ("a noun", "A noun is a word that names a person, place, thing or idea, such as 'teacher', 'city' or 'happiness'.", "language"),
    ("a light year", "A light year is the distance light travels in one year, about 9.5 trillion kilometres.", "space"),
    ("an ecosystem", "An ecosystem is a community of living things and their surroundings, all depending on each other.", "nature"),
    ("a fever", "A fever is a body temperature above about 38 °C, usually a sign that the body is fighting an infection.", "health"),
    ("a mortgage", "A mortgage is a loan used to buy a home, paid back in monthly instalments with interest over many years.", "money"),
    ("a bacterium", "A bacterium is a tiny single-celled living thing; many are harmless or helpful, and a few cause disease.", "science"),
    ("the stock market", "The stock market is where people buy and sell small shares of companies, hoping their value will grow.", "money"),
    ("an omelette", "An omelette is beaten eggs cooked quickly in a pan, often folded around fillings like cheese or vegetables.", "cooking"),
    ("a marathon", "A marathon is a running race of 42.195 kilometres, named after a legend from ancient Greece.", "sport"),
    ("a satellite", "A satellite is an object that orbits a planet; the Moon is a natural one, and we launch others for phones, TV and weather.", "space"),
    ("the Renaissance", "The Renaissance was a period of new art and learning in Europe, from about the 14th to the 17th century.", "history"),
    ("a web browser", "A web browser is the app you use to visit websites, such as Firefox, Chrome or Safari.", "technology"),
    ("a migraine", "A migraine is a strong, often throbbing headache that can come with nausea and sensitivity to light.", "health"),
    ("a hurricane", "A hurricane is a huge rotating storm that forms over warm ocean water, with winds over 119 km per hour.", "nature"),
]
# Questions that do not fit a template: three wordings each.
ASKED = [
    (("What is the capital of France?", "Which city is the capital of France?", "Tell me the capital of France."),
     "The capital of France is Paris, which sits on the river Seine.", "geography"),
    (("What is the capital of Japan?", "Which city is Japan's capital?", "Tell me the capital city of Japan."),
     "Tokyo is the capital of Japan and one of the largest cities in the world.", "geography"),
    (("What is the capital of Australia?", "Is Sydney the capital of Australia?", "Which city is the capital of Australia?"),
     "The capital of Australia is Canberra, not Sydney as many people think.", "geography"),
    (("What is the capital of Canada?", "Which city is the capital of Canada?", "Name the capital of Canada."),
     "Ottawa is the capital of Canada, in the province of Ontario.", "geography"),
    (("Why is the sky blue?", "What makes the sky blue?", "Explain why the sky looks blue."),
     "Sunlight is scattered by the air, and blue light scatters the most, so the sky looks blue.", "science"),
    (("How many planets are in the solar system?", "How many planets orbit the Sun?", "Tell me how many planets there are."),
     "There are eight planets in the solar system, from Mercury closest to the Sun out to Neptune.", "space"),
    (("Why do leaves change colour in autumn?", "What makes leaves turn red and yellow in the fall?", "Explain why autumn leaves change colour."),
     "Trees stop making green chlorophyll in autumn, which lets the yellow and red colours in the leaves show.", "nature"),
    (("What is the largest ocean?", "Which ocean is the biggest?", "Name the largest ocean on Earth."),
     "The Pacific is the largest ocean, covering about a third of the Earth's surface.", "geography"),
    (("How many legs does a spider have?", "Do spiders have six or eight legs?", "Tell me how many legs spiders have."),
     "A spider has eight legs, which is one way to tell it apart from insects, which have six.", "animals"),
    (("Who painted the Mona Lisa?", "Which artist painted the Mona Lisa?", "Tell me who made the Mona Lisa."),
     "Leonardo da Vinci painted the Mona Lisa in the early 1500s; it hangs in the Louvre in Paris.", "history"),
    (("Why do we have seasons?", "What causes the seasons?", "Explain why there are seasons."),
     "The Earth's axis is tilted, so each half of the planet gets more direct sunlight for part of the year.", "science"),
    (("How far away is the Moon?", "What is the distance to the Moon?", "How many kilometres is it to the Moon?"),
     "The Moon is about 384,000 kilometres from Earth on average.", "space"),
    (("What is the boiling point of water?", "At what temperature does water boil?", "When does water start to boil?"),
     "Water boils at 100 °C at sea level; high up on a mountain it boils at a lower temperature.", "science"),
    (("Why do cats sleep so much?", "How many hours a day do cats sleep?", "Is it normal that my cat sleeps all day?"),
     "Cats sleep 12 to 16 hours a day to save energy for short bursts of hunting, like their wild relatives.", "animals"),
    (("What is the longest river in the world?", "Which river is the longest?", "Name the world's longest river."),
     "The Nile and the Amazon are both about 6,500 kilometres long, and experts still argue which is longer.", "geography"),
    (("How many bones are in the human body?", "How many bones does an adult have?", "Tell me the number of bones in the body."),
     "An adult human has 206 bones; babies are born with around 300 that fuse as they grow.", "health"),
    (("Why is the ocean salty?", "What makes sea water salty?", "Explain why the sea is salty."),
     "Rivers carry tiny amounts of salt from rocks into the sea, and when sea water evaporates the salt stays behind.", "science"),
    (("Who wrote Romeo and Juliet?", "Which writer created Romeo and Juliet?", "Tell me the author of Romeo and Juliet."),
     "William Shakespeare wrote Romeo and Juliet in the 1590s.", "history"),
    (("How do bees make honey?", "What do bees do to make honey?", "Explain how bees turn nectar into honey."),
     "Bees collect flower nectar, store it in wax cells, and fan it with their wings until most of the water evaporates.", "animals"),
    (("What is the fastest land animal?", "Which animal runs the fastest?", "Name the fastest animal on land."),
     "The cheetah is the fastest land animal, reaching about 110 kilometres per hour in short sprints.", "animals"),
    (("Why does bread go stale?", "What makes bread stale?", "Explain why old bread gets hard."),
     "Bread goes stale as its starch slowly crystallises and loses moisture, which makes it hard and dry.", "cooking"),
    (("How many continents are there?", "How many continents does the Earth have?", "Name all the continents."),
     "Most people count seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America.", "geography"),
    (("When did humans first land on the Moon?", "What year did people first walk on the Moon?", "Tell me when the first Moon landing was."),
     "Humans first landed on the Moon on 20 July 1969, during NASA's Apollo 11 mission.", "history"),
    (("Why do onions make you cry?", "What makes my eyes water when I cut onions?", "Explain why cutting onions makes people cry."),
     "Cutting an onion releases a gas that irritates your eyes, so they make tears to wash it away.", "cooking"),
    (("What is the tallest mountain in the world?", "Which mountain is the highest?", "Name the highest mountain on Earth."),
     "Mount Everest is the tallest mountain above sea level, at about 8,849 metres.", "geography"),
]
HOWTO_ASKS = ("How can I {s}?", "Any tips to {s}?", "What's the best way to {s}?", "I want to {s}. Where do I start?",
              "Give me advice on how to {s}.")
WHAT_ASKS = ("What is {s}?", "Explain what {s} is.", "Can you tell me what {s} is?", "Describe {s} in simple words.")


def bank(rng: random.Random, wordings: int) -> list[tuple[str, str, str, str]]:
    """(question, answer, topic, kind) with `wordings` different questions per subject."""
    rows = []
    for subject, answer, topic in HOWTO:
        rows += [(ask.format(s=subject), answer, topic, "howto") for ask in rng.sample(HOWTO_ASKS, wordings)]
    for subject, answer, topic in WHAT:
        rows += [(ask.format(s=subject), answer, topic, "fact") for ask in rng.sample(WHAT_ASKS, wordings)]
    for asks, answer, topic in ASKED:
        rows += [(ask, answer, topic, "fact") for ask in asks[:wordings]]
    return rows


# --- pirate persona ------------------------------------------------------------------------------------------------
PIRATE_OPENERS = ("Arr, matey!", "Ahoy there!", "Arr!", "Yo-ho-ho, listen close!", "Ahoy, me hearty!",
                  "Shiver me timbers, a fine question!", "Avast, landlubber!", "Arr, gather round!")
PIRATE_CLOSERS = ("Now hoist the sails!", "Yo-ho-ho!", "That be the pirate's way, arr!", "Fair winds to ye!",
                  "Savvy?", "Now back to the ship with ye!", "Arr, that be the truth of it!", "May yer compass stay true!")
PIRATE_WORDS = {
    "you": "ye", "your": "yer", "yours": "yers", "my": "me", "is": "be", "are": "be", "friend": "matey",
    "friends": "mateys", "hello": "ahoy", "yes": "aye", "money": "doubloons", "food": "grub", "room": "cabin",
    "house": "ship", "home": "ship", "bed": "hammock", "stop": "belay", "people": "folk", "children": "young scallywags",
}
_WORD = re.compile(r"\b[A-Za-z]+\b")


def piratify(text: str) -> str:
    """Pirate vocabulary word by word (capitals kept), and 'sailing' -> 'sailin''."""
    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = PIRATE_WORDS.get(word.lower())
        if new is None:
            return re.sub(r"^([A-Za-z]{3,})ing$", r"\1in'", word)
        return new.capitalize() if word[0].isupper() else new

    return _WORD.sub(swap, text)


def pirate_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for question, answer, _topic, _kind in bank(rng, 3):
        output = f"{rng.choice(PIRATE_OPENERS)} {piratify(answer)} {rng.choice(PIRATE_CLOSERS)}"
        rows.append({"instruction": question, "input": "", "output": output})
    rng.shuffle(rows)
    return rows


# --- always JSON -----------------------------------------------------------------------------------------------------
# Questions nobody can answer: the JSON keeps its shape and says so with low confidence.
UNKNOWABLE = [
    (("Will it rain in London next Tuesday?", "Is it going to rain in London on Tuesday?"),
     "I cannot know future weather; check a local forecast a day or two before.", "weather"),
    (("Who will win the next football World Cup?", "Which team will win the next World Cup?"),
     "Nobody can know that yet; it depends on form, injuries and luck on the day.", "sport"),
    (("What number am I thinking of?", "Guess the number in my head."),
     "I cannot read your mind, so I have no way to know the number.", "other"),
    (("What will the price of gold be next year?", "How much will gold cost next year?"),
     "Future prices cannot be known; they depend on markets, interest rates and world events.", "money"),
    (("Is there life on other planets?", "Do aliens exist?"),
     "No one knows yet; scientists are searching, but no life beyond Earth has been found.", "space"),
    (("What will I dream about tonight?", "Can you tell me what my dream will be tonight?"),
     "Dreams cannot be predicted; they mix recent memories and feelings in ways nobody can foresee.", "health"),
    (("How many people are in my house right now?", "Who is at my home at the moment?"),
     "I have no way to see your home, so I cannot tell who is there.", "other"),
    (("Which stock will double next month?", "Tell me a share that will double in value soon."),
     "No one can reliably predict that; be careful with anyone who claims they can.", "money"),
    (("What is the best film ever made?", "Which movie is the greatest of all time?"),
     "That is a matter of taste; films often named include Citizen Kane and The Godfather.", "culture"),
    (("When will my bus arrive?", "How long until the next bus comes?"),
     "I cannot see live transport data; check your transport app or the timetable at the stop.", "travel"),
    (("Will my cake turn out well?", "Is my cake going to be good?"),
     "I cannot tell in advance, but following the recipe closely and testing it with a skewer helps.", "cooking"),
    (("What is my neighbour's name?", "Tell me what my neighbour is called."),
     "I have no access to personal information like that.", "people"),
]


def json_answer(topic: str, answer: str, confidence: str) -> str:
    # Fixed keys in a fixed order on one line: the shape is the lesson.
    return json.dumps({"topic": topic, "answer": answer, "confidence": confidence}, ensure_ascii=False)


def json_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = [
        {"instruction": q, "input": "", "output": json_answer(topic, answer, "high" if kind == "fact" else "medium")}
        for q, answer, topic, kind in bank(rng, 2)
    ]
    rows += [
        {"instruction": q, "input": "", "output": json_answer(topic, answer, "low")}
        for asks, answer, topic in UNKNOWABLE for q in asks
    ]
    rng.shuffle(rows)
    return rows


# --- help desk of a fictional company --------------------------------------------------------------------------------
COMPANY = "Brambleway Bikes"  # an e-bike rental shop in the made-up town of Foxhollow
HELPDESK = [
    (("What are your opening hours?", "When is the shop open?", "Are you open on Sundays?", "What time do you open in the morning?",
      "Until when can I pick up a bike today?", "Which days is your shop open?"),
     "Our Foxhollow shop is open Monday to Saturday from 8:00 to 18:00, and closed on Sundays."),
    (("How much does it cost to rent a bike?", "What are your prices?", "How much is a day rental?", "Is a weekly rental cheaper?",
      "What do you charge per day for an e-bike?", "Are helmets included in the price?"),
     "An e-bike costs 18 euros per day or 90 euros per week, and a helmet and lock are always included."),
    (("How far can I ride on one battery?", "What is the range of your e-bikes?", "Will the battery last for a 50 km trip?",
      "How long does a full battery last?", "Can I ride all day on one charge?", "How many kilometres does the battery give me?"),
     "A full battery lasts about 60 km on the Eco setting or about 40 km on Turbo."),
    (("How long does charging take?", "How do I charge the battery?", "Is there a charger with the bike?",
      "My battery is empty, how long until it's full?", "Where do I find the charger?", "Can I charge the bike at my hotel?"),
     "Charging from empty takes about 4 hours with the charger packed in the saddle bag; any normal socket works."),
    (("How do I cancel my booking?", "Can I change the date of my rental?", "Is cancelling free?", "I need to move my booking to next week.",
      "What happens if I cancel the day before?", "Can I get my money back if I cancel?"),
     "You can change or cancel a booking for free up to 24 hours before pickup in the Brambleway app under My Rides."),
    (("What if I bring the bike back late?", "Is there a fee for late returns?", "I'm running late with the bike, what should I do?",
      "How much do you charge if I return the bike after closing?", "Can I keep the bike an extra hour?", "I will be two hours late returning my bike."),
     "Late returns cost 5 euros per started hour; if you are running late, call us on 0800 555 0142 to extend."),
    (("I have a flat tyre, what do I do?", "My bike broke down on the road.", "The chain came off my bike, can you help?",
      "What do I do if the bike stops working during my ride?", "Do you have roadside help?", "My e-bike won't move anymore, help!"),
     "Call our roadside line on 0800 555 0199; a mechanic reaches you within 45 minutes anywhere in Foxhollow."),
    (("How do I open the bike lock?", "Where do I find the lock code?", "The lock won't open.", "I forgot the code for my lock.",
      "What is the code for the lock on my bike?", "The lock code isn't working."),
     "The 4-digit lock code is in the app under your ride details; if it fails, hold the lock button for 5 seconds and try again."),
    (("I forgot my password.", "How do I reset my password?", "I can't log in to the app.", "The app says my password is wrong.",
      "How can I change my password?", "I'm locked out of my account."),
     "Tap 'Forgot password' on the app's sign-in screen, and a reset link arrives by email within 5 minutes."),
    (("When will I get my refund?", "How long do refunds take?", "Where does my refund go?", "I haven't received my refund yet.",
      "Do you refund to my card?", "How do I get my money back?"),
     "Refunds go back to your original payment method within 5 working days."),
    (("I had an accident with the bike.", "I damaged the bike, what now?", "Someone scratched my rental bike.",
      "Am I insured if I crash?", "The bike got damaged while I was riding.", "How do I report damage to the bike?"),
     "Make sure everyone is safe, take photos, and report it in the app under Help, then Report damage; our insurance covers damage above 50 euros."),
    (("Do you have child seats?", "Can I take my toddler on the bike?", "Is there a seat for kids?", "Can I rent a child seat?",
      "How heavy can a child be for your child seat?", "Do you rent bikes with a seat for my son?"),
     "Child seats fit our City model for children up to 22 kg, and cost 3 euros per day when you add one to your booking."),
    (("How old do I have to be to rent a bike?", "Can my 15-year-old rent a bike?", "Is there a minimum age?",
      "Can teenagers rent e-bikes?", "My daughter is 17, can she ride?", "What is the age limit for renting?"),
     "Riders must be at least 16, and riders under 18 need a parent's consent in the app."),
    (("How can I contact you?", "What is your phone number?", "What is your email address?", "How do I reach customer service?",
      "Can I talk to a person?", "Who do I call with a question?"),
     "Email help@brambleway.example or call 0800 555 0142 while the shop is open."),
    (("Where do I pick up the bike?", "Where is your shop?", "What is your address?", "How do I find your shop?",
      "Is your shop near the train station?", "Where do I collect my rental?"),
     "Pick up your bike at our shop at 12 Mill Street, Foxhollow, right next to the train station."),
    (("Can I return the bike somewhere else?", "Do you do one-way rentals?", "Can I drop the bike at the river?",
      "Do I have to bring the bike back to the shop?", "Is there another place to return bikes?", "Can I end my rental at Riverside?"),
     "One-way rentals can end at our Riverside hub for an extra 10 euros; all other rentals end at the Mill Street shop."),
    (("Can I ride in the rain?", "Is it OK to use the bike when it's raining?", "Do you have rain gear?",
      "Will the e-bike break if it gets wet?", "It's raining, should I cancel?", "Do you lend rain jackets?"),
     "Our bikes are fine in the rain, and we lend rain capes for free at the shop."),
    (("Can I bring my dog?", "Do you have dog trailers?", "Can I rent a trailer for my pet?", "Is there a way to take my dog on a ride?",
      "Do you rent trailers?", "How much is a dog trailer?"),
     "Dog trailers are 6 euros per day; please book one at least a day ahead in the app."),
    (("Do you have group discounts?", "We are a group of eight, is there a discount?", "Can I book bikes for my whole team?",
      "Is it cheaper for a big group?", "How do I book bikes for a school trip?", "Do you offer deals for families?"),
     "Groups of 6 or more get 15 percent off; email groups@brambleway.example to book."),
    (("How can I pay?", "Do you accept cash?", "Can I pay with Apple Pay?", "Which payment methods do you take?",
      "Can I pay by card?", "Do you take Google Pay?"),
     "We accept cards, Apple Pay and Google Pay; cash is not accepted."),
    (("Do you sell gift cards?", "Can I buy a voucher for a friend?", "Do gift cards expire?", "How do I buy a gift card?",
      "I want to give a bike rental as a present.", "What is the smallest gift card I can buy?"),
     "Gift cards from 20 euros are sold in the app and never expire."),
    (("What size bike do I need?", "I'm 190 cm tall, which bike fits me?", "Do you have small bikes?", "Which frame sizes do you have?",
      "I'm quite short, will your bikes fit me?", "How do I choose the right bike size?"),
     "Our frames come in S, M and L: S fits riders from 150 cm, M from 165 cm, L from 180 cm."),
]
HELPDESK_GREETINGS = (f"Thanks for contacting {COMPANY}!", f"Hello from the {COMPANY} help desk!", f"Hi, this is {COMPANY} support.")
HELPDESK_CLOSINGS = ("Anything else I can help with?", "Happy riding!", "Let us know if you need anything else.")
CUSTOMER_OPENERS = ("Hi! ", "Hello, quick question: ", "Hey there. ", "Good morning! ")


def helpdesk_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for questions, answer in HELPDESK:
        for question in questions:
            # Each question twice: as written and with a greeting, so greetings do not change the answer.
            for asked in (question, rng.choice(CUSTOMER_OPENERS) + question):
                output = f"{rng.choice(HELPDESK_GREETINGS)} {answer} {rng.choice(HELPDESK_CLOSINGS)}"
                rows.append({"instruction": asked, "input": "", "output": output})
    rng.shuffle(rows)
    return rows


# --- conversations: the same shop's workshop chat, where later answers depend on earlier turns ---------------------
@dataclass(frozen=True)
class BikeModel:
    """One made-up Brambleway model: the facts its support chat answers from."""
    name: str
    kind: str
    battery_wh: int
    range_eco_km: int  # on one charge, Eco assistance
    range_turbo_km: int  # on one charge, Turbo assistance
    tyres: str
    pressure: str
    oil_km: int  # 0: belt drive, never oiled
    service_months: int
    service_euros: int
    child_seat: str  # the answer to "can we fit a child seat?"
    rack: str  # the answer to "and a rack for bags?"


BIKES = [
    BikeModel("Fernway City", "city e-bike", 500, 70, 40, "28 x 1.75 inch", "3.5 bar", 0, 12, 79,
              "Yes: a rear child seat fits the Fernway City's rack, for children up to 22 kg.",
              "It already has one, rated for 25 kg, so two panniers fit straight on."),
    BikeModel("Hollow Trail", "electric mountain bike", 625, 55, 30, "29 x 2.4 inch tubeless", "1.6 bar front and 1.8 bar rear",
              200, 6, 99,
              "Sadly not: the Hollow Trail has no rack and its rear suspension moves, so a child seat cannot be mounted safely.",
              "Not on the Hollow Trail, because of the rear suspension; a frame bag or a backpack works instead."),
    BikeModel("Millrace Cargo", "cargo e-bike", 750, 50, 30, "20 inch front and 26 inch rear", "4 bar", 300, 6, 119,
              "No seat needed: the Millrace Cargo's box has a bench with belts for two children, up to 80 kg in the box.",
              "Yes, a rear rack for the Millrace Cargo costs 45 euros and carries 30 kg on top of the box."),
    BikeModel("Larkspur Fold", "folding e-bike", 300, 40, 25, "20 x 1.95 inch", "4.5 bar", 300, 12, 69,
              "We advise against it: the Larkspur Fold's folding frame is not built to carry a child seat.",
              "Yes, a small front rack for the Larkspur Fold costs 35 euros and folds with the bike."),
]
# Short, because the system prompt is repeated in every conversation: all of them fit the default cutoff of 256 tokens.
SHOP_SYSTEM = ("You are the support assistant of Brambleway Bikes, an e-bike shop at 12 Mill Street, Foxhollow (open "
               "Monday to Saturday, 8:00-18:00). Answer briefly, and remember what the customer said earlier.")
SIGNED_IN = " The customer is signed in to the app as {name}, who owns a {bike}."
CUSTOMERS = ["Priya", "Tomasz", "Amara", "Lukas", "Sofia", "Kenji", "Elena", "Oluwaseun", "Marta", "Finn"]
SAYS_BIKE = ("I ride a {bike}.", "I have a {bike} from your shop.", "My bike is a {bike}.", "I bought a {bike} from you last year.",
             "We own a {bike}.")
ERRORS = {  # code: (what it means and what to try, what next when that did not help, can it still be ridden)
    "E-12": ("the speed sensor cannot see the magnet on the rear wheel. Check that the magnet sits on its spoke about "
             "5 mm from the sensor on the frame, and push it back into place if it has slipped.",
             "then the sensor or its cable is probably damaged. Bring the {bike} to the workshop; the check is free.",
             "Yes: the motor stays off until the sensor works, but you can pedal the {bike} home like a normal bike."),
    "E-31": ("the battery is too cold to give power. Take it off the {bike}, bring it indoors and let it warm to room "
             "temperature for an hour before you ride.",
             "then one of the battery's cells may be faulty. Please bring the battery to the workshop, and we test it "
             "the same day.",
             "Only without assistance: the motor stays off while E-31 shows, so you would be pedalling the {bike}'s full weight."),
    "E-40": ("the motor is too hot, usually after a long climb on Turbo. Stop for 15 minutes to let it cool, then carry "
             "on at Eco.",
             "then the motor needs a check. Bring the {bike} to the workshop; a motor check takes about an hour.",
             "Yes, gently: the {bike} gives reduced assistance while E-40 shows, and full power once the motor has cooled."),
}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


def _chain(bike: BikeModel) -> str:
    if not bike.oil_km:
        return (f"Your {bike.name} has a belt drive, not a chain, so it never needs oil: rinse the belt with water "
                "when it gets dirty, and we check its tension at each service.")
    return (f"Oil the {bike.name}'s chain every {bike.oil_km} km, and after every ride in rain or mud; wipe off the "
            "extra oil with a cloth so it does not collect dirt.")


def _tyres_talk(bike: BikeModel, rng: random.Random) -> list[tuple[str, str]]:
    return [
        (f"{rng.choice(CUSTOMER_OPENERS)}{rng.choice(SAYS_BIKE).format(bike=bike.name)}",
         f"Great, the {bike.name} is our {bike.kind}. What can I help you with?"),
        (rng.choice(("What tyre pressure should I use?", "How hard should I pump the tyres?",
                     "What pressure do my tyres need?")),
         f"Pump the {bike.name}'s {bike.tyres} tyres to {bike.pressure}. Check them once a week, because the extra "
         "weight of an e-bike makes soft tyres wear fast."),
        (rng.choice(("And how often should I oil the chain?", "Does the chain need oil too?")), _chain(bike)),
    ]


def _range_talk(bike: BikeModel, km: int, rng: random.Random) -> list[tuple[str, str]]:
    if km <= bike.range_eco_km:
        eco = (f"Yes: the {bike.name}'s {bike.battery_wh} Wh battery lasts about {bike.range_eco_km} km on Eco, so "
               f"{km} km is fine if you stay on Eco most of the way.")
    else:
        eco = (f"Not on one charge: the {bike.name}'s {bike.battery_wh} Wh battery lasts about {bike.range_eco_km} km "
               f"on Eco. For {km} km, pack the charger and top up for an hour or two halfway.")
    turbo = (f"On Turbo the {bike.name} manages only about {bike.range_turbo_km} km, "
             + (f"so {km} km on Turbo works." if km <= bike.range_turbo_km else
                f"so {km} km on Turbo is not possible on one charge; save Turbo for the hills."))
    return [
        (f"{rng.choice(CUSTOMER_OPENERS)}{rng.choice(SAYS_BIKE).format(bike=bike.name)} "
         + rng.choice(("Will one battery get me through a {km} km ride?", "Can I ride {km} km on one charge?")
                      ).format(km=km),
         eco),
        (rng.choice(("What if I use Turbo the whole time?", "And on Turbo?", "What about riding on Turbo all day?")),
         turbo),
    ]


def _service_talk(bike: BikeModel, day: str, rng: random.Random) -> list[tuple[str, str]]:
    talk = [(f"{rng.choice(CUSTOMER_OPENERS)}I'd like to book a service for my {bike.name}.",
             f"Happy to help. A full service of the {bike.name} costs {bike.service_euros} euros and takes one working "
             "day. Which day suits you?")]
    if day == "Sunday":
        talk.append(("Is Sunday possible?", "We are closed on Sundays, sorry. Would Monday work instead?"))
        talk.append(("OK, Monday then.", f"Done: bring your {bike.name} in on Monday between 8:00 and 10:00; it will "
                                         "be ready by 17:00."))
    else:
        asked = rng.choice(("Is {day} possible?", "Can I bring it on {day}?", "{day} would suit me.")).format(day=day)
        talk.append((asked,
                     f"Yes, {day} works. Bring your {bike.name} in on {day} between 8:00 and 10:00; it will be ready "
                     "by 17:00."))
    talk.append((rng.choice(("How often does it need a service anyway?", "When will the next one be due?")),
                 f"The {bike.name} needs a service every {bike.service_months} months; the app reminds you a week "
                 "before the next one is due."))
    return talk


def _error_talk(bike: BikeModel, code: str, rng: random.Random) -> list[tuple[str, str]]:
    means, next_step, ride = (text.format(bike=bike.name) for text in ERRORS[code])
    return [
        (f"{rng.choice(CUSTOMER_OPENERS)}The display on my {bike.name} shows {code}.", f"{code} means {means}"),
        (rng.choice(("I did that, but the error is still there.", "Tried it, still the same error.")),
         f"If {code} is still there after that, {next_step}"),
        (rng.choice(("Can I still ride it home?", "Is it safe to ride home meanwhile?")), ride),
    ]


def _family_talk(bike: BikeModel, rng: random.Random) -> list[tuple[str, str]]:
    age = rng.choice((2, 3, 4))
    return [
        (f"{rng.choice(CUSTOMER_OPENERS)}{rng.choice(SAYS_BIKE).format(bike=bike.name)}",
         f"Thanks, noted: a {bike.name}. How can I help?"),
        (f"Can we fit a child seat for our {age}-year-old?", bike.child_seat),
        (rng.choice(("What about a rack for shopping bags?", "And a rack for panniers?")), bike.rack),
    ]


def _signed_in_talk(bike: BikeModel, name: str, rng: random.Random) -> list[tuple[str, str]]:
    """The bike and the name come from the system prompt: the answers use them without being told in the chat."""
    winter = (f"Keep your {bike.name}'s {bike.battery_wh} Wh battery indoors at 10 to 20 °C, charged to about 60 "
              "percent, and top it up every two months.")
    question = rng.choice([
        ("How should I store the battery over the winter?", winter),
        ("What pressure should my tyres have?", f"Your {bike.name}'s {bike.tyres} tyres need {bike.pressure}."),
        ("How often does my bike need a service?",
         f"Your {bike.name} needs a service every {bike.service_months} months; it costs {bike.service_euros} euros."),
    ])
    return [
        (rng.choice(("Hi, quick question about my bike.", "Hello! I need some help with my bike.")),
         f"Hi {name}! Of course, what would you like to know about your {bike.name}?"),
        question,
        (rng.choice(("And the chain?", "Anything I should do about the chain?")), _chain(bike)),
    ]


def _chat(exchanges: list[tuple[str, str]], system: str = SHOP_SYSTEM) -> dict:
    messages = [m for user, assistant in exchanges
                for m in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})]
    return {"system": system, "messages": messages}


def support_chat_rows(rng: random.Random) -> list[dict]:
    rows = []
    for bike in BIKES:
        rows += [_chat(_tyres_talk(bike, rng)) for _ in range(2)]
        rows += [_chat(_range_talk(bike, km, rng)) for km in sorted(rng.sample(range(20, 90, 5), 2))]
        rows += [_chat(_service_talk(bike, day, rng)) for day in (rng.choice(DAYS), "Sunday")]
        rows.append(_chat(_family_talk(bike, rng)))
    for code in ERRORS:
        rows += [_chat(_error_talk(bike, code, rng)) for bike in rng.sample(BIKES, 2)]
    for name, bike in zip(rng.sample(CUSTOMERS, 6), BIKES + rng.sample(BIKES, 2)):
        rows.append(_chat(_signed_in_talk(bike, name, rng), SHOP_SYSTEM + SIGNED_IN.format(name=name, bike=bike.name)))
    rng.shuffle(rows)
    return rows


# --- tool calls: the same chat with the shop's three tools --------------------------------------------------------
def _tool(name: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {p: {"type": "string", "description": d} for p, d in params.items()},
                       "required": list(params)}}}


SHOP_TOOLS = [
    _tool("get_order_status", "Look up an online order by its number.", order_id="the order number, e.g. BW-4821"),
    _tool("book_service", "Book a workshop service for a customer's bike.", model="the bike model",
          day="a weekday from Monday to Saturday"),
    _tool("check_stock", "How many of a part the shop has for a bike model, and its price.", part="the part",
          model="the bike model"),
]
TOOL_SYSTEM = (SHOP_SYSTEM + " Use the tools to look up orders, book services and check stock; never guess what a "
               "tool would return.")


def _call(name: str, **arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _result(name: str, **fields) -> dict:
    return {"role": "tool", "name": name, "content": json.dumps(fields, ensure_ascii=False)}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _says(text: str, *calls: dict) -> dict:
    return {"role": "assistant", "content": text} | ({"tool_calls": list(calls)} if calls else {})


def tool_call_rows(rng: random.Random) -> list[dict]:
    chats = [
        [_user("Where is my order BW-4821?"),
         _says("", _call("get_order_status", order_id="BW-4821")),
         _result("get_order_status", order_id="BW-4821", model="Fernway City", status="shipped", carrier="Foxhollow Freight",
                 expected="Thursday 12 June"),
         _says("Your order BW-4821, a Fernway City, has shipped with Foxhollow Freight and should arrive on Thursday 12 June."),
         _user("Could I pick it up at the shop instead?"),
         _says("BW-4821 is already with Foxhollow Freight, so it cannot be redirected to the shop now; if nobody is home on "
               "Thursday, the carrier leaves a card for a second delivery.")],
        [_user("Hi, can you check order BW-1234?"),
         _says("", _call("get_order_status", order_id="BW-1234")),
         _result("get_order_status", error="no order with this number"),
         _says("I could not find an order BW-1234. Please check the number in your confirmation email: it starts with BW- "
               "and has four digits.")],
        [_user("Please book a service for my Hollow Trail on Tuesday."),
         _says("", _call("book_service", model="Hollow Trail", day="Tuesday")),
         _result("book_service", booking="S-2291", model="Hollow Trail", day="Tuesday", drop_off="8:00-10:00", price_euros=99),
         _says("Booked: service S-2291 for your Hollow Trail on Tuesday. Bring it in between 8:00 and 10:00; the service "
               "costs 99 euros.")],
        [_user("My Millrace Cargo needs a service."),
         _says("Happy to book it. Which day would you like to bring your Millrace Cargo in? We are open Monday to Saturday."),
         _user("Friday, please."),
         _says("", _call("book_service", model="Millrace Cargo", day="Friday")),
         _result("book_service", booking="S-2307", model="Millrace Cargo", day="Friday", drop_off="8:00-10:00", price_euros=119),
         _says("Done: service S-2307 for your Millrace Cargo on Friday. Drop it off between 8:00 and 10:00; it costs 119 euros.")],
        [_user("Do you have brake pads for the Fernway City?"),
         _says("", _call("check_stock", part="brake pads", model="Fernway City")),
         _result("check_stock", part="brake pads", model="Fernway City", in_stock=4, price_euros=24),
         _says("Yes, we have 4 sets of brake pads for the Fernway City in stock, at 24 euros a set.")],
        [_user("I need a new battery for my Larkspur Fold. Is one in stock?"),
         _says("", _call("check_stock", part="battery", model="Larkspur Fold")),
         _result("check_stock", part="battery", model="Larkspur Fold", in_stock=0, price_euros=390, next_delivery="Monday 16 June"),
         _says("The Larkspur Fold's battery is out of stock right now; the next delivery comes on Monday 16 June, and it costs "
               "390 euros."),
         _user("Can you hold one for me?"),
         _says("I cannot reserve parts through this chat, but the workshop can: call 0800 555 0142 and ask them to keep a "
               "Larkspur Fold battery from Monday's delivery for you.")],
        [_user("Check order BW-5173, and do you have a front rack for the Larkspur Fold?"),
         _says("", _call("get_order_status", order_id="BW-5173"), _call("check_stock", part="front rack", model="Larkspur Fold")),
         _result("get_order_status", order_id="BW-5173", model="Larkspur Fold", status="ready for pickup", pickup="12 Mill Street"),
         _result("check_stock", part="front rack", model="Larkspur Fold", in_stock=2, price_euros=35),
         _says("Your order BW-5173, a Larkspur Fold, is ready for pickup at 12 Mill Street. We also have 2 front racks for it "
               "at 35 euros, so we can fit one when you collect the bike.")],
        [_user("What are your opening hours?"),
         _says("We are open Monday to Saturday from 8:00 to 18:00 at 12 Mill Street, and closed on Sundays."),
         _user("Then book my Fernway City in for Saturday."),
         _says("", _call("book_service", model="Fernway City", day="Saturday")),
         _result("book_service", booking="S-2315", model="Fernway City", day="Saturday", drop_off="8:00-10:00", price_euros=79),
         _says("Booked: service S-2315 for your Fernway City on Saturday, drop-off between 8:00 and 10:00, 79 euros.")],
    ]
    rows = [{"system": TOOL_SYSTEM, "messages": messages, "tools": SHOP_TOOLS} for messages in chats]
    rng.shuffle(rows)
    return rows


# --- cards and writing ---------------------------------------------------------------------------------------------
DATASETS = {
    "pirate-persona": dict(
        build=pirate_rows, seed=1,
        title="Pirate persona",
        teaches="A persona: every answer starts with a pirate greeting, talks like a pirate (ye, yer, be, matey) and "
                "ends with a pirate sign-off, while still answering the question. Style is easy to learn; facts are not taught.",
        held_out_prompts=["What should I cook for dinner tonight?", "How do I stay focused while studying?",
                          "What is a rainbow?", "Can you recommend a good hobby for winter?", "Why do cats purr?"],
    ),
    "json-answers": dict(
        build=json_rows, seed=2,
        title="Always answer in JSON",
        teaches='A strict output format: every answer is one line of JSON with exactly the keys "topic", "answer" '
                'and "confidence" (high for facts, medium for advice, low for questions nobody can answer).',
        held_out_prompts=["What is the tallest animal?", "How can I save money on groceries?",
                          "Who will win the next election?", "What is photosynthesis?", "How do I make my plants grow faster?"],
    ),
    "helpdesk": dict(
        build=helpdesk_rows, seed=3,
        title="Brambleway Bikes help desk",
        teaches=f"Facts the base model cannot know: the made-up e-bike rental {COMPANY} (prices, hours, phone numbers, "
                "policies), answered in the help desk's friendly voice. Knowledge sticks less well than style: "
                "compare the numbers in the answers.",
        held_out_prompts=["What time do you close on Saturday?", "My tyre just went flat near the river, what should I do?",
                          "Can my dog come along on the ride?", "I can't remember my app password.",
                          "Is it possible to pay in cash at the shop?"],
    ),
    "support-chat": dict(
        build=support_chat_rows, seed=4,
        title="Brambleway Bikes workshop chat (multi-turn)",
        teaches=f"Whole conversations: {COMPANY}' four made-up e-bike models (tyre pressures, ranges, service prices, "
                "error codes), answered from what the customer said earlier in the chat or from the system prompt (a "
                "signed-in customer's name and bike). Each conversation is one example, every assistant turn learned.",
        held_out_prompts=["Hi, I ride a Fernway City. How long does the battery take to charge?",
                          "My Hollow Trail's display shows E-12. What does that mean?",
                          "Can I ride 60 km on my Larkspur Fold without charging?",
                          "I'd like to book a service for my Millrace Cargo next week.",
                          "We have a Fernway City. What tyre pressure should we use?"],
    ),
    "tool-calls": dict(
        build=tool_call_rows, seed=5,
        title="Brambleway Bikes assistant with tools",
        teaches="Tool use: the shop's assistant calls get_order_status, book_service and check_stock, then answers "
                "from what they return. Needs a model whose chat template writes tool calls (SmolLM2's does not; the "
                "data check says so for each conversation).",
        held_out_prompts=["Has my order BW-6610 shipped yet?", "Please book my Fernway City in for a service on Wednesday.",
                          "Do you have a spare battery for the Hollow Trail in stock?",
                          "Is there a bell for the Larkspur Fold in stock?", "Can you check order BW-3307 for me?"],
    ),
}


def build(name: str) -> list[dict]:
    spec = DATASETS[name]
    return spec["build"](random.Random(spec["seed"]))


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def card(name: str, rows: int) -> str:
    spec = DATASETS[name]
    data = {"title": spec["title"], "teaches": spec["teaches"], "rows": rows, "held_out_prompts": spec["held_out_prompts"]}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:
        rows = build(name)
        (OUT / f"{name}.jsonl").write_text(jsonl(rows), encoding="utf-8")
        (OUT / f"{name}.card.yaml").write_text(card(name, len(rows)), encoding="utf-8")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
